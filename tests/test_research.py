"""The research optimizers of seed 003 against per-element references written here from the
notebook's algorithm cells (plain torch, tensor by tensor, with the fixes docs/research.md lists),
on every execution path; the predicates, the update recorder and the rectifier plot."""
from __future__ import annotations

import io
import math
import pickle
import sys
from functools import partial

import pytest
import torch

import optcraft as oc
from optcraft import engine
from optcraft.blocks.research import centralize_grad, keep_param, last_update
from optcraft.optimizers import research as R
from optcraft.predicates import by_name, by_ndim, conv_not_cinEq256_coutLt256, conv_weight

# conv weight, linear weight | conv weight the notebook's predicate refuses (256 in, < 256 out),
# a bias, an all-zero bias.
SHAPES = [(4, 3, 3, 3), (6, 5), (8, 256, 1, 1), (5,), (3,)]
GROUPS = (2, 5)  # params[:2] and params[2:]
STEPS = 8


def make_params():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    params[-1].zero_()
    return params


def gradients():
    """Per step, per parameter: a gradient or None (each parameter misses some steps); the
    linear weight's gradient has exact zeros in its first column."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(STEPS):
        row = []
        for j, s in enumerate(SHAPES):
            grad = torch.randn(s, generator=g, dtype=torch.float64)
            if j == 1:
                grad[:, 0] = 0
            row.append(None if (i + j) % 5 == 0 else grad)
        out.append(row)
    return out


def run_optcraft(factory, impl):
    params = [p.clone().requires_grad_() for p in make_params()]
    opt = factory([params[:GROUPS[0]], params[GROUPS[0]:]], impl)
    for row in gradients():
        for p, grad in zip(params, row):
            p.grad = None if grad is None else grad.clone()
        opt.step()
    return [p.detach() for p in params], opt


def run_reference(step, hypers):
    """The notebook's loop, with each parameter's own step count (the notebook took the group's
    from its first parameter)."""
    params = make_params()
    states = [{"theta_0": p.clone()} for p in params]
    for row in gradients():
        for j, (p, grad) in enumerate(zip(params, row)):
            if grad is None:
                continue
            st = states[j]
            st["t"] = st.get("t", 0) + 1
            step(p, grad.clone(), st, **hypers[0 if j < GROUPS[0] else 1])
    return params


# ---- the references, from the algorithm cells ------------------------------------------------------

def softplus(x, beta):
    """log(1 + exp(beta x)) / beta, written so that exp cannot overflow."""
    return x.clamp_min(0) + torch.log1p(torch.exp(-beta * x.abs())) / beta


def ema(st, key, value, beta):
    st[key] = beta * st.get(key, torch.zeros_like(value)) + (1 - beta) * value
    return st[key]


def adam_hats(st, g, mom, sqr_mom):
    m, v = ema(st, "m", g, mom), ema(st, "v", g * g, sqr_mom)
    return m / (1 - mom ** st["t"]), v / (1 - sqr_mom ** st["t"])


def ratio_or_one(num, den):
    return num / den if num != 0 and den != 0 else 1.0


def channel_rms(x):
    return x.pow(2).mean(dim=[1, 2, 3], keepdim=True).sqrt()


def notebook_condition(p):
    return p.dim() >= 4 and not (p.shape[1] == 256 and p.shape[0] < 256)


def ref_sadam(p, g, st, lr, mom, sqr_mom, smooth, wd):
    m_hat, v_hat = adam_hats(st, g, mom, sqr_mom)
    p.sub_(lr * m_hat / softplus(v_hat.sqrt(), smooth) + lr * wd * p)


def ref_sradam(p, g, st, lr, mom, sqr_mom, smooth, wd):
    m_hat, v_hat = adam_hats(st, g, mom, sqr_mom)
    t = st["t"]
    rho_inf = 2 / (1 - sqr_mom) - 1
    rho = rho_inf - 2 * t * sqr_mom ** t / (1 - sqr_mom ** t)
    if rho > 4:
        r = (rho_inf - 4) * (rho_inf - 2) * rho / ((rho - 4) * (rho - 2) * rho_inf)
        update = lr * m_hat / softplus((r * v_hat).sqrt(), smooth)
    else:
        update = lr * m_hat
    p.sub_(update + lr * wd * p)


def ref_lamb(p, g, st, lr, mom, sqr_mom, eps, wd):
    m_hat, v_hat = adam_hats(st, g, mom, sqr_mom)
    adam = m_hat / (v_hat.sqrt() + eps) + wd * p
    p.sub_(lr * ratio_or_one(p.norm(), adam.norm()) * adam)


def ref_adam_gc(p, g, st, lr, mom, sqr_mom, eps, wd):
    if g.dim() == 4:
        g = g - g.mean(dim=[1, 2, 3], keepdim=True)
    m_hat, v_hat = adam_hats(st, g, mom, sqr_mom)
    p.sub_(lr * m_hat / (v_hat.sqrt() + eps) + lr * wd * p)


def ref_stable_adam(p, g, st, lr, mom, sqr_mom, eps, wd):
    # With wd, optcraft measures the channel's growth after the decoupled decay (documented).
    p.mul_(1 - lr * wd)
    m_hat, v_hat = adam_hats(st, g, mom, sqr_mom)
    s = m_hat / (v_hat.sqrt() + eps)
    if notebook_condition(p):
        now, init = channel_rms(p), channel_rms(st["theta_0"])
        s = s * torch.where((now == 0) | (init == 0), 1.0, now / init)
    p.sub_(lr * s)


def ref_adam_awd(p, g, st, lr, mom, sqr_mom, eps):
    m_hat, v_hat = adam_hats(st, g, mom, sqr_mom)
    p.sub_(lr * m_hat / (v_hat.sqrt() + eps))
    if notebook_condition(p):
        p.div_(channel_rms(p)).mul_(channel_rms(st["theta_0"]))


def ref_um(p, g, st, lr, mom, wd, norm):
    m = ema(st, "m", g, mom)
    m_hat = m / (1 - mom ** st["t"])
    size = m_hat.norm() if norm == "l2" else m_hat.pow(2).mean().sqrt()
    update = lr * m_hat / size if size != 0 else torch.zeros_like(p)
    p.sub_(update + lr * wd * p)


def ref_pre_lamb(p, g, st, lr, mom, wd):
    g_hat = ratio_or_one(p.norm(), g.norm()) * g
    m_hat = ema(st, "m", g_hat, mom) / (1 - mom ** st["t"])
    p.sub_(lr * m_hat + lr * wd * p)


def ref_duv_adam(p, g, st, lr, mom, sqr_mom, wd):
    m_prev = st.get("m", torch.zeros_like(p))
    r = torch.where(m_prev != 0, g / m_prev, 1.0)
    m_hat = ema(st, "m", g, mom) / (1 - mom ** st["t"])
    v_hat = ema(st, "v", (r - 1) ** 2, sqr_mom) / (1 - sqr_mom ** st["t"])
    p.sub_(lr * m_hat / (1 + v_hat.sqrt()) + lr * wd * p)


def ref_su_adam(p, g, st, lr, mom, sqr_mom, wd):
    s = g.sign()
    m_prev = st.get("m", torch.zeros_like(p))
    r = torch.where(m_prev == 0, 1.0, s / m_prev)
    m_hat = ema(st, "m", s, mom) / (1 - mom ** st["t"])
    v_hat = ema(st, "v", (r - 1).abs(), sqr_mom) / (1 - sqr_mom ** st["t"])
    scale = p.abs().mean() if p.abs().mean() != 0 else 1.0
    p.sub_(lr * scale * m_hat / (1 + v_hat) + lr * wd * p)


def ref_badam(p, g, st, lr, mom, sqr_mom, smooth, wd, secant):
    t = st["t"]
    m_hat = ema(st, "m", g, mom) / (1 - mom ** t)
    scale = p.abs().mean() if p.abs().mean() != 0 else 1.0
    if t == 1:
        s = lr * scale * m_hat
    else:
        last = st["s"]
        if secant == "softplus":  # the algorithm cell
            phi = (g - st["g"]) / softplus(last, smooth)
        else:  # the notebook's code, its sign_clamp without the debugger
            floor = last.abs().mean()
            clamped = torch.where(last.abs() > floor, last, last.sign() * floor)
            clamped = torch.where(clamped == 0, floor, clamped)
            phi = torch.where(clamped == 0, 0.0, (g - st["g"]) / clamped)
        v = ema(st, "v", phi, sqr_mom)
        s = lr * scale * m_hat / softplus((v / (1 - sqr_mom ** (t - 1))).abs(), smooth)
    p.sub_(s + lr * wd * p)
    st["s"], st["g"] = s, g


def two(a, b):
    return [dict(a), dict(b)]


def spread(hypers):
    """The recipes' keywords for the two groups' hyperparameters: a list per name."""
    return {k: [hypers[0][k], hypers[1][k]] for k in hypers[0]}


CASES = {
    "SAdam": (R.SAdam, ref_sadam, two(dict(lr=0.01, mom=0.9, sqr_mom=0.99, smooth=50.0, wd=0.0),
                                      dict(lr=0.03, mom=0.8, sqr_mom=0.9, smooth=5.0, wd=0.1))),
    "SRAdam": (R.SRAdam, ref_sradam, two(dict(lr=0.01, mom=0.9, sqr_mom=0.9, smooth=50.0, wd=0.0),
                                         dict(lr=0.03, mom=0.8, sqr_mom=0.999, smooth=5.0, wd=0.1))),
    "LAMB": (R.LAMB, ref_lamb, two(dict(lr=0.01, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=0.0),
                                   dict(lr=0.03, mom=0.8, sqr_mom=0.99, eps=1e-6, wd=0.1))),
    "AdamGC": (R.AdamGC, ref_adam_gc, two(dict(lr=0.01, mom=0.9, sqr_mom=0.99, eps=1e-8, wd=0.0),
                                          dict(lr=0.03, mom=0.8, sqr_mom=0.9, eps=1e-6, wd=0.1))),
    "StableAdam": (R.StableAdam, ref_stable_adam,
                   two(dict(lr=0.1, mom=0.9, sqr_mom=0.99, eps=1e-8, wd=0.0),
                       dict(lr=0.03, mom=0.8, sqr_mom=0.9, eps=1e-6, wd=0.1))),
    "AdamAWD": (R.AdamAWD, ref_adam_awd, two(dict(lr=0.1, mom=0.9, sqr_mom=0.99, eps=1e-8),
                                             dict(lr=0.03, mom=0.8, sqr_mom=0.9, eps=1e-6))),
    "UM": (R.UM, ref_um, two(dict(lr=0.01, mom=0.9, wd=0.0, norm="rms"),
                             dict(lr=0.03, mom=0.8, wd=0.1, norm="rms"))),
    "UM-l2": (partial(R.UM, norm="l2"), ref_um, two(dict(lr=0.01, mom=0.9, wd=0.0, norm="l2"),
                                                    dict(lr=0.03, mom=0.8, wd=0.1, norm="l2"))),
    "PreLAMB": (R.PreLAMB, ref_pre_lamb, two(dict(lr=0.01, mom=0.9, wd=0.0),
                                             dict(lr=0.03, mom=0.8, wd=0.1))),
    "DuvAdam": (R.DuvAdam, ref_duv_adam, two(dict(lr=0.01, mom=0.9, sqr_mom=0.999, wd=0.0),
                                             dict(lr=0.03, mom=0.8, sqr_mom=0.9, wd=0.1))),
    "SUAdam": (R.SUAdam, ref_su_adam, two(dict(lr=0.01, mom=0.9, sqr_mom=0.99, wd=0.0),
                                          dict(lr=0.03, mom=0.8, sqr_mom=0.9, wd=0.1))),
    "BAdam": (R.BAdam, ref_badam, two(
        dict(lr=0.01, mom=0.9, sqr_mom=0.99, smooth=50.0, wd=0.0, secant="softplus"),
        dict(lr=0.03, mom=0.8, sqr_mom=0.99, smooth=20.0, wd=0.1, secant="softplus"))),
    "BAdam-sign_clamp": (partial(R.BAdam, secant="sign_clamp"), ref_badam, two(
        dict(lr=0.01, mom=0.9, sqr_mom=0.99, smooth=50.0, wd=0.0, secant="sign_clamp"),
        dict(lr=0.03, mom=0.8, sqr_mom=0.99, smooth=20.0, wd=0.0, secant="sign_clamp"))),
}


def factory_of(name):
    recipe, _, hypers = CASES[name]
    keywords = {k: v for k, v in spread(hypers).items() if k not in ("norm", "secant")}
    return lambda groups, impl: recipe(groups, impl=impl, **keywords)


def cases_and_impls():
    for name in sorted(CASES):
        for impl in (*engine.IMPLS, "foreach-sliced"):
            marks = [pytest.mark.slow] if impl == "compiled" else []
            yield pytest.param(name, impl, marks=marks, id=f"{name}-{impl}")


@pytest.mark.parametrize("name,impl", list(cases_and_impls()))
def test_research_optimizers_match_the_notebooks_formulas(name, impl, monkeypatch):
    _, step, hypers = CASES[name]
    # compiled: the conv weights and the wide one compiled, the rest on the foreach path
    monkeypatch.setattr(oc.compiler_hints, "PER_TENSOR_MIN_NUMEL", 100)
    if impl == "foreach-sliced":  # elementwise blocks on slices of 50 elements
        monkeypatch.setattr(engine.ForeachPath, "slice_numel", 50)
        impl = "foreach"
    if impl == "fused":
        with pytest.raises(ValueError, match="no fused kernel"):
            factory_of(name)(make_params(), impl)
        return
    ours, opt = run_optcraft(factory_of(name), impl)
    if impl == "compiled":  # each kind of piece traced once (its state keeps its signature)
        functions = opt.path.functions
        assert functions and all(len(fn.graphs) == 1 for fn in functions.values())
    expected = run_reference(step, hypers)
    for i, (a, b) in enumerate(zip(ours, expected)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10, msg=lambda m: f"param {i}: {m}")
    # Every parameter moved (the all-zero one included), and stayed finite.
    for a, p in zip(ours, make_params()):
        assert torch.isfinite(a).all() and not torch.equal(a, p)


def _log1pexp_reference(y: float) -> float:
    """log(1 + e^y) in Python's double arithmetic, rewritten above 0 so that exp cannot overflow."""
    return y + math.log1p(math.exp(-y)) if y > 0 else math.log1p(math.exp(y))


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["eager", "compiled"])
@pytest.mark.parametrize("nonnegative", [False, True], ids=["any-sign", "nonnegative"])
def test_log1pexp_is_the_softplus_without_its_scale(compiled, nonnegative):
    from optcraft.tensorlist import TensorList

    ys = [0.0, 1e-12, 1e-3, 0.5, 1.0, 5.0, 19.9, 20.1, 40.0, 300.0, 1e4]
    if not nonnegative:
        ys += [-1e-12, -1e-3, -0.5, -5.0, -19.9, -20.1, -40.0, -300.0]
    # float64: the eager kernel is torch's softplus (linear above 20), the compiled one has no
    # threshold; both must be within 1e-9 of log(1 + e^y) relative to it
    y = torch.tensor(ys, dtype=torch.float64)
    fn = (lambda t: TensorList([t.clone()]).log1pexp(nonnegative).tensors[0])
    run = torch.compile(fn, fullgraph=True) if compiled else fn
    got = run(y)
    expected = torch.tensor([_log1pexp_reference(v) for v in ys], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=0)
    # float32 keeps the relative accuracy, tiny values (e^-300 is 0 there) included
    got32 = run(y.float())
    torch.testing.assert_close(got32.double(), expected.float().double(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["eager", "compiled"])
def test_log1p_unit_is_log1p_on_the_unit_interval(compiled):
    """`log1p_unit` (log1pexp's logarithm of 1 + exp(-|y|)): in float32, within 2.5e-7 of
    log1p relative to it over [0, 1] (a dense grid and values down to 1e-37), 0 at 0; in float64,
    torch's own log1p."""
    from optcraft.compiler_hints import log1p_unit

    e = torch.cat([torch.linspace(0, 1, 100_001, dtype=torch.float64),
                   torch.logspace(-37, -1, 361, dtype=torch.float64)])
    fn = torch.compile(log1p_unit, fullgraph=True) if compiled else log1p_unit
    e32 = e.float()
    got = fn(e32).double()
    expected = torch.log1p(e32.double())
    positive = e32 > 0
    assert ((got - expected).abs()[positive] / expected[positive]).max() < 2.5e-7
    assert got[0] == 0
    torch.testing.assert_close(fn(e), torch.log1p(e), rtol=1e-15, atol=0)


def test_every_recipe_is_covered_and_documented():
    assert {n.split("-")[0] for n in CASES} == set(R.__all__)
    for name in R.__all__:
        doc = getattr(R, name).__doc__
        assert "p <-" in doc or "p^k <-" in doc, name


def test_sradam_uses_the_rectified_step_once_rho_exceeds_4():
    """The notebook's SRAdam took rho_inf = 2/beta2 - 1 (about 1 for beta2 = 0.999), so rho_t never
    exceeded 4 and it never left plain momentum; here the adaptive step starts at step 5."""
    p = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = R.SRAdam([p], lr=0.1, sqr_mom=0.999)
    moves = []
    for i in range(6):
        before = p.detach().clone()
        p.grad = torch.full_like(p, 100.0)
        opt.step()
        moves.append(float((before - p.detach())[0]))
    # plain momentum steps are lr * m_hat = 10; the rectified step is tiny (r_t is large at first)
    assert moves[:4] == pytest.approx([10.0] * 4)
    assert 0 < moves[4] < 1 and 0 < moves[5] < 1


def test_duvadam_runs_on_tensors_with_zero_momentum_elements():
    """The notebook tested `state['exp_avg'] != 0` with a Python `if` (an error on any tensor of
    more than one element); here elements where the momentum is 0 get r = 1."""
    p = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = R.DuvAdam([p], lr=0.1)
    for g in ([1.0, 0.0, 2.0, 0.0], [2.0, 0.0, 2.0, 1.0]):
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    assert torch.isfinite(p).all()
    dev = opt.state[p]["dev_avg"]
    # step 2: r - 1 = 2/0.1 - 1 = 19, 0 (m = 0), 2/0.2 - 1 = 9, 0 (m = 0)
    expected = torch.tensor([19.0 ** 2, 0.0, 9.0 ** 2, 0.0], dtype=torch.float64) * 0.001
    torch.testing.assert_close(dev, expected)


def test_badam_with_the_algorithm_cells_secant_converges_on_a_noisy_quadratic():
    """The notebook's code divided the gradient change by the last step clamped at its own mean,
    so a small step makes a large curvature and a smaller step: on noisy gradients the estimate
    runs away (on the digits of `optcraft compare` it overflows within 24 steps).  The algorithm
    cell's softplus keeps the divisor above log(2) / smooth."""
    def run(secant):
        g = torch.Generator().manual_seed(0)
        p = torch.ones(50, requires_grad=True)
        opt = R.BAdam([p], lr=0.01, secant=secant)
        for _ in range(300):
            p.grad = 2 * p.detach() + 0.5 * torch.randn(50, generator=g)
            opt.step()
        return float(p.detach().pow(2).mean()), float(opt.state[p]["curv_avg"].abs().max())

    (loss, curvature), (code_loss, code_curvature) = run("softplus"), run("sign_clamp")
    assert loss < 0.01 and curvature < 5  # the true curvature is 2
    assert code_loss > 10 * loss and code_curvature > 10
    with pytest.raises(ValueError, match="secant"):
        R.BAdam([torch.zeros(1, requires_grad=True)], lr=0.1, secant="clamp")


# ---- LAMB: one implementation, flags ----------------------------------------------------------

def test_notebook_lamb_is_fastais_lamb_step_with_the_papers_flags():
    p = torch.zeros(2, requires_grad=True)
    ours, fastai = R.LAMB([p], lr=0.1).cbs, oc.Lamb([p], lr=0.1).cbs
    flags = dict(norm="l2", wd_in_ratio=True, max_ratio=None)
    assert [cb.func for cb in ours[-2:]] == fastai[-2:] == [oc.lamb_trust_ratio, oc.lamb_step]
    assert [cb.keywords for cb in ours[-2:]] == [flags, flags]
    assert [getattr(cb, "func", cb) for cb in ours[:-2]] == \
        [getattr(cb, "func", cb) for cb in fastai[1:-2]]


# ---- gradient centralisation and predicates -------------------------------------------------------

def test_predicates():
    conv, linear, wide, bias = (torch.zeros(s) for s in [(4, 3, 3, 3), (6, 5), (8, 256, 1, 1), (5,)])
    assert [conv_weight(t) for t in (conv, linear, wide, bias, torch.zeros(2, 3, 4))] == \
        [True, False, True, False, True]
    assert [conv_not_cinEq256_coutLt256(t) for t in (conv, linear, wide, torch.zeros(256, 256, 1, 1))] \
        == [True, False, False, True]
    assert by_ndim(1, 2)(linear) and by_ndim(1, 2)(bias) and not by_ndim(1, 2)(conv)
    either = by_ndim(1) | conv_weight
    assert either(bias) and either(conv) and not either(linear)
    assert (~conv_weight)(linear) and not (conv_weight & by_ndim(3))(conv)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Linear(2, 2))
    head = by_name(model, "1.*")
    assert [head(p) for p in model.parameters()] == [False, False, True, True]
    assert repr(head) == "by_name('1.*')" and repr(either) == "(by_ndim(1) | conv_weight)"
    with pytest.raises(ValueError, match="no parameter name matches"):
        by_name(model, "conv*")
    copied_model, copied = pickle.loads(pickle.dumps((model, head)))
    assert [copied(p) for p in copied_model.parameters()] == [False, False, True, True]


@pytest.mark.parametrize("impl", ["reference", "foreach"])
def test_centralize_grad_in_any_chain_with_a_name_predicate(impl):
    """SGD with gradient centralisation on the linear layer only, chosen by name; the gradients in
    `.grad` are left as backward made them."""
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Linear(4, 3)).double()
    chosen = by_name(model, "1.weight")
    opt = oc.Optimizer(model.parameters(), [partial(centralize_grad, predicate=chosen), oc.sgd_step],
                       lr=0.1, impl=impl)
    g = torch.Generator().manual_seed(0)
    before = [p.detach().clone() for p in model.parameters()]
    grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in model.parameters()]
    for p, grad in zip(model.parameters(), grads):
        p.grad = grad.clone()
    opt.step()
    for i, (p, b, grad) in enumerate(zip(model.parameters(), before, grads)):
        used = grad - grad.mean(dim=1, keepdim=True) if i == 2 else grad
        torch.testing.assert_close(p.detach(), b - 0.1 * used)
        assert torch.equal(p.grad, grad)


def test_with_blocks_adds_centralisation_to_a_named_optimizer():
    params = make_params()[:2]
    plain = [p.clone().requires_grad_() for p in params]
    centred = [p.clone().requires_grad_() for p in params]
    opt = R.with_blocks(oc.Adam(centred, lr=0.01, eps=1e-8, sqr_mom=0.99, wd=0.0),
                        before=[centralize_grad])
    ref = R.AdamGC(plain, lr=0.01)
    for row in gradients()[:3]:
        for a, b, grad in zip(plain, centred, row):
            a.grad = b.grad = grad
        opt.step()
        ref.step()
    for a, b in zip(plain, centred):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


# ---- channel-RMS state: checkpoints ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["StableAdam", "AdamAWD"])
def test_channel_rms_state_survives_a_weights_only_checkpoint(name):
    full, _ = run_optcraft(factory_of(name), "foreach")
    params = [p.clone().requires_grad_() for p in make_params()]
    groups = [params[:GROUPS[0]], params[GROUPS[0]:]]
    opt = factory_of(name)(groups, "foreach")
    rows = gradients()

    def steps(opt, rows):
        for row in rows:
            for p, grad in zip(params, row):
                p.grad = None if grad is None else grad.clone()
            opt.step()
    steps(opt, rows[:4])
    assert opt.state[params[0]]["init_rms"].shape == params[0].shape
    assert opt.state[params[2]]["init_rms"] is None  # refused by the notebook's predicate
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed = factory_of(name)(groups, "reference")
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    steps(resumed, rows[4:])
    for a, b in zip(params, full):
        torch.testing.assert_close(a.detach(), b, rtol=1e-12, atol=1e-15)


# ---- the update recorder --------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["reference", "foreach", "auto"])
def test_record_updates_keeps_the_last_step_of_any_optimizer(impl):
    params = [p.clone().requires_grad_() for p in make_params()]
    opts = [R.record_updates(oc.Adam(params[:3], lr=0.01, wd=0.1, impl=impl)),
            oc.Optimizer(params[3:], R.record_updates([oc.weight_decay, oc.sgd_step]), lr=0.1,
                         wd=0.1, impl=impl)]
    assert opts[1].cbs[0] is keep_param and opts[1].cbs[-1] is last_update
    for row in gradients()[:3]:
        before = [p.detach().clone() for p in params]
        for p, grad in zip(params, row):
            p.grad = grad
        for opt in opts:
            opt.step()
        for p, b, grad in zip(params, before, row):
            if grad is not None:
                state = opts[0].state if any(p is q for q in params[:3]) else opts[1].state
                torch.testing.assert_close(state[p]["update"], b - p.detach(), rtol=0, atol=1e-15)


def test_record_updates_on_the_fused_adam_moves_to_auto():
    p = torch.ones(3, requires_grad=True)
    opt = R.record_updates(oc.Adam([p], lr=0.1, impl="fused"))
    assert opt.impl == "auto"
    with pytest.raises(TypeError, match="optcraft Optimizer"):
        R.record_updates(torch.optim.SGD([p], lr=0.1))


# ---- the rectifier plot -------------------------------------------------------------------------

def test_plot_radam_rectifier():
    from optcraft.plots import plot_radam_rectifier

    beta, length = 0.9, 40
    fig = plot_radam_rectifier(beta, length)
    rect_ax, rho_ax = fig.axes
    t, r = rect_ax.lines[0].get_data()
    assert list(t) == list(range(1, length + 1))
    rho_inf = 2 / (1 - beta) - 1
    for step, value in zip(t, r):
        rho = rho_inf - 2 * step * beta ** step / (1 - beta ** step)
        if rho > 4:
            expected = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
            assert value == pytest.approx(expected)
        else:
            assert math.isnan(value)
    _, rho = rho_ax.lines[0].get_data()
    assert rho[0] == pytest.approx(1.0) and rho[-1] < rho_inf


def test_plot_radam_rectifier_names_the_extra_when_matplotlib_is_missing(monkeypatch):
    from optcraft.plots import plot_radam_rectifier

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install optcraft\[cli\]"):
        plot_radam_rectifier(0.99, 10)


# ---- the documentation page ---------------------------------------------------------------------

def test_docs_research_examples_run_and_train():
    """docs/research.md's Python blocks, in order, in one namespace; then a few steps of each
    optimizer they build on a small regression."""
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parents[1] / "docs" / "research.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for code in blocks:
        exec(compile(code, str(page), "exec"), namespace)
    model, opt = namespace["model"], namespace["opt"]
    assert isinstance(opt, torch.optim.Optimizer) and opt.cbs[0] is keep_param
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(20):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    conv = next(model.parameters())
    assert opt.state[conv]["update"].shape == conv.shape
