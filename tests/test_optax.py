"""optcraft.optax against optax's documented numbers and per-element references written here from
optax's formulas (scale_by_adam, add_decayed_weights, scale_by_trust_ratio, trace, scale_by_lion),
and against torch.optim where torch has the same algorithm.  Also: masks as the per-parameter
`do_wd` flag, honoured inside one param group by every execution path."""
import math

import pytest
import torch

from optcraft import engine, optax, schedules

# ---- optax's documented example ---------------------------------------------------------------


def test_lamb_reproduces_optax_documented_example():
    # optax.lamb's docstring: f(x) = sum(x**2), params [1., 2., 3.], learning_rate=0.003,
    # five updates, the objective printed with '{:.2E}' after each (float32, as jax runs it)
    params = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    assert f"{(params ** 2).sum().item():.1f}" == "14.0"
    solver = optax.lamb([params], learning_rate=0.003)
    printed = []
    for _ in range(5):
        solver.zero_grad()
        (params ** 2).sum().backward()
        solver.step()
        printed.append(f"{(params ** 2).sum().item():.2E}")
    assert printed == ["1.39E+01", "1.38E+01", "1.38E+01", "1.37E+01", "1.36E+01"]


# ---- per-element references from optax's formulas --------------------------------------------------
# Each reference keeps its own state in Python dicts, in float64, one tensor at a time; norms are
# sums of squares written out.

def l2(t):
    return math.sqrt(sum(float(x) ** 2 for x in t.flatten()))


def adam_direction(st, g, b1, b2, eps, eps_root, nesterov=False):
    """optax's scale_by_adam: the bias-corrected direction, updating st's moments and count."""
    st["mu"] = b1 * st["mu"] + (1 - b1) * g
    st["nu"] = b2 * st["nu"] + (1 - b2) * g * g
    st["count"] += 1
    t = st["count"]
    if nesterov:
        mu_hat = b1 * st["mu"] / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1 ** t)
    else:
        mu_hat = st["mu"] / (1 - b1 ** t)
    nu_hat = st["nu"] / (1 - b2 ** t)
    return mu_hat / ((nu_hat + eps_root).sqrt() + eps)


def ref_adamw(p, g, st, t, lr, b1, b2, eps, eps_root, wd, decay, nesterov=False):
    u = adam_direction(st, g, b1, b2, eps, eps_root, nesterov)
    if decay:
        u = u + wd * p
    return p - lr(t) * u


def ref_lamb(p, g, st, t, lr, b1, b2, eps, eps_root, wd, decay):
    u = adam_direction(st, g, b1, b2, eps, eps_root)
    if decay:
        u = u + wd * p
    p_norm, u_norm = l2(p), l2(u)
    ratio = 1.0 if p_norm == 0 or u_norm == 0 else p_norm / u_norm
    return p - lr(t) * ratio * u


def ref_sgd(p, g, st, t, lr, momentum, nesterov):
    if momentum is None:
        return p - lr(t) * g
    st["trace"] = g + momentum * st["trace"]
    update = g + momentum * st["trace"] if nesterov else st["trace"]
    return p - lr(t) * update


def ref_lars(p, g, st, t, lr, wd, decay, trust_coefficient, eps, trust, momentum, nesterov):
    u = g + wd * p if decay else g
    if trust:
        p_norm, u_norm = l2(p), l2(u)
        ratio = trust_coefficient * p_norm / (u_norm + eps)
        u = u * (1.0 if p_norm == 0 or u_norm == 0 else ratio)
    u = lr(t) * u
    st["trace"] = u + momentum * st["trace"]
    return p - (u + momentum * st["trace"] if nesterov else st["trace"])


def ref_lion(p, g, st, t, lr, b1, b2, wd, decay):
    direction = torch.sign(b1 * st["mu"] + (1 - b1) * g)
    if decay:
        direction = direction + wd * p
    st["mu"] = b2 * st["mu"] + (1 - b2) * g
    return p - lr(t) * direction


SHAPES = [(4, 3), (3,), (2, 2, 2), (5,), ()]


def make_params(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]
    params[3] = torch.zeros(5, dtype=dtype)  # |p| = 0: LAMB's and LARS's ratio is 1
    return [p.requires_grad_() for p in params]


def gradients(steps, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    out = [[torch.randn(s, generator=g, dtype=dtype) for s in SHAPES] for _ in range(steps)]
    for i in range(steps):
        out[i][1] = torch.zeros(3, dtype=dtype) if i == 2 else out[i][1]  # |u| may be 0 for LARS
    return out


def run_both(make_opt, reference, state_keys, decay_mask, steps=6, extra_mask=None, **ref_kw):
    params = make_params()
    opt = make_opt(params)
    expected = [p.detach().clone() for p in params]
    states = [{"count": 0, **{k: torch.zeros_like(p) for k in state_keys}} for p in expected]
    grads = gradients(steps)
    for t, gs in enumerate(grads):
        for i, (p, g) in enumerate(zip(params, gs)):
            p.grad = g.clone()
            kw = dict(ref_kw)
            if decay_mask is not None:
                kw["decay"] = decay_mask[i]
            if extra_mask is not None:
                kw["trust"] = extra_mask[i]
            expected[i] = reference(expected[i], g, states[i], t, **kw)
        opt.step()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)
    return opt, params


MASK = [True, False, True, True, False]
CONST = lambda lr: (lambda t: lr)  # noqa: E731


@pytest.mark.parametrize("eps_root", [0.0, 1e-4])
def test_lamb_matches_optax_formula(eps_root):
    run_both(lambda ps: optax.lamb(ps, 0.01, b1=0.8, b2=0.95, eps=1e-6, eps_root=eps_root,
                                   weight_decay=0.1, mask=MASK),
             ref_lamb, ("mu", "nu"), MASK, lr=CONST(0.01), b1=0.8, b2=0.95, eps=1e-6,
             eps_root=eps_root, wd=0.1)


def test_lamb_with_a_schedule_and_a_plain_callable():
    sched = schedules.warmup_cosine(0.02, 2, 6)
    run_both(lambda ps: optax.lamb(ps, sched, weight_decay=0.01),
             ref_lamb, ("mu", "nu"), [True] * 5, lr=sched, b1=0.9, b2=0.999, eps=1e-6,
             eps_root=0.0, wd=0.01)
    run_both(lambda ps: optax.lamb(ps, lambda t: 0.01 / (1 + t)),
             ref_lamb, ("mu", "nu"), [True] * 5, lr=lambda t: 0.01 / (1 + t), b1=0.9,
             b2=0.999, eps=1e-6, eps_root=0.0, wd=0.0)


@pytest.mark.parametrize("eps_root,nesterov", [(0.0, False), (1e-3, False), (0.0, True)])
def test_adam_and_adamw_match_optax_formula(eps_root, nesterov):
    run_both(lambda ps: optax.adam(ps, 0.01, b1=0.8, b2=0.9, eps=1e-8, eps_root=eps_root,
                                   nesterov=nesterov),
             ref_adamw, ("mu", "nu"), None, lr=CONST(0.01), b1=0.8, b2=0.9, eps=1e-8,
             eps_root=eps_root, wd=0.0, decay=False, nesterov=nesterov)
    run_both(lambda ps: optax.adamw(ps, 0.01, b1=0.8, b2=0.9, eps=1e-8, eps_root=eps_root,
                                    weight_decay=0.1, mask=MASK, nesterov=nesterov),
             ref_adamw, ("mu", "nu"), MASK, lr=CONST(0.01), b1=0.8, b2=0.9, eps=1e-8,
             eps_root=eps_root, wd=0.1, nesterov=nesterov)


@pytest.mark.parametrize("momentum,nesterov", [(None, False), (0.9, False), (0.9, True)])
def test_sgd_matches_optax_formula(momentum, nesterov):
    run_both(lambda ps: optax.sgd(ps, 0.05, momentum=momentum, nesterov=nesterov),
             ref_sgd, ("trace",), None, lr=CONST(0.05), momentum=momentum, nesterov=nesterov)


def assert_same_as_torch(make_ours, make_theirs, steps=8):
    ours, theirs = make_params(), make_params()
    a, b = make_ours(ours), make_theirs(theirs)
    for gs in gradients(steps):
        for p, q, g in zip(ours, theirs, gs):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_torch_sgd(nesterov):
    assert_same_as_torch(lambda ps: optax.sgd(ps, 0.05, momentum=0.9, nesterov=nesterov),
                         lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=nesterov))


def test_adamw_matches_torch_adamw():
    assert_same_as_torch(lambda ps: optax.adamw(ps, 0.01, weight_decay=0.05),
                         lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.05, eps=1e-8,
                                                      betas=(0.9, 0.999)))


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_matches_optax_formula(nesterov):
    trust = [True, True, False, True, True]
    run_both(lambda ps: optax.lars(ps, 0.1, weight_decay=0.01, weight_decay_mask=MASK,
                                   trust_coefficient=0.02, eps=1e-9, trust_ratio_mask=trust,
                                   momentum=0.8, nesterov=nesterov),
             ref_lars, ("trace",), MASK, extra_mask=trust, lr=CONST(0.1), wd=0.01,
             trust_coefficient=0.02, eps=1e-9, momentum=0.8, nesterov=nesterov)


def test_lion_matches_optax_formula():
    run_both(lambda ps: optax.lion(ps, 1e-3, b1=0.9, b2=0.99, weight_decay=0.1, mask=MASK),
             ref_lion, ("mu",), MASK, lr=CONST(1e-3), b1=0.9, b2=0.99, wd=0.1)


# ---- masks ------------------------------------------------------------------------------------

def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4),
                               torch.nn.Linear(4, 2)).double()


def decayed(opt):
    return [opt.state[p].get("do_wd", True) for g in opt.param_groups for p in g["params"]]


def test_mask_forms_give_the_same_flags():
    want = [True, False, False, False, True, False]  # weights of the two Linear layers
    by_list = optax.lamb(small_model().parameters(), 1e-3, weight_decay=0.1, mask=want)
    by_fn = optax.lamb(small_model().parameters(), 1e-3, weight_decay=0.1,
                       mask=lambda p: p.ndim > 1)
    by_names = optax.lamb(small_model().named_parameters(), 1e-3, weight_decay=0.1,
                          mask=["0.weight", "2.weight"])
    for opt in (by_list, by_fn, by_names):
        assert decayed(opt) == want
        assert len(opt.param_groups) == 1
    assert decayed(optax.lamb(small_model().parameters(), 1e-3, mask=None)) == [True] * 6


def test_masked_parameters_are_not_decayed():
    # with a zero gradient Adam's direction is 0: only the weight decay can move a parameter
    model = small_model()
    opt = optax.adamw(model.named_parameters(), 0.1, weight_decay=0.5, mask=["0.weight"])
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = list(model.parameters())
    torch.testing.assert_close(after[0], before[0] * (1 - 0.1 * 0.5))
    for a, b in zip(after[1:], before[1:]):
        assert torch.equal(a, b)


def test_mask_survives_state_dict_and_clear_state():
    model = small_model()
    opt = optax.lion(model.parameters(), 1e-3, mask=lambda p: p.ndim > 1)
    sd = opt.state_dict()
    fresh = optax.lion(small_model().parameters(), 1e-3)
    fresh.load_state_dict(sd)
    assert decayed(fresh) == decayed(opt)
    opt.clear_state()
    assert decayed(opt) == [True, False, False, False, True, False]


@pytest.mark.parametrize("mask,error,match", [
    ([True, False], ValueError, "got 2 bools for 6 parameters"),
    (["0.weight"], ValueError, "parameter names need named parameters"),
    (lambda p: "yes", ValueError, "must return True or False"),
    ("0.weight", TypeError, "must be None, a bool"),
    ([1, 0, 1, 0, 1, 0], TypeError, "must be None, a bool"),
])
def test_bad_masks_are_refused(mask, error, match):
    with pytest.raises(error, match=match):
        optax.lamb(small_model().parameters(), 1e-3, mask=mask)


def test_unknown_mask_names_are_named():
    with pytest.raises(ValueError, match="no parameter is named '3.weight'"):
        optax.adamw(small_model().named_parameters(), 1e-3, mask=["0.weight", "3.weight"])


@pytest.mark.parametrize("call,match", [
    (lambda ps: optax.lamb(ps, -1.0), r"lamb: learning_rate must be in \[0, inf\)"),
    (lambda ps: optax.lamb(ps, 1e-3, b1=1.0), r"lamb: b1 must be in \[0, 1\), got 1.0"),
    (lambda ps: optax.adam(ps, 1e-3, b2=-0.1), r"adam: b2 must be in \[0, 1\)"),
    (lambda ps: optax.adamw(ps, 1e-3, weight_decay=-1), "adamw: weight_decay must be in"),
    (lambda ps: optax.sgd(ps, 1e-3, nesterov=True), "nesterov=True needs a momentum"),
    (lambda ps: optax.sgd(ps, 1e-3, momentum=1.5), r"sgd: momentum must be in \[0, 1\)"),
    (lambda ps: optax.lars(ps, 1e-3, trust_coefficient=-1), "lars: trust_coefficient"),
    (lambda ps: optax.lion(ps, 1e-3, b2=2.0), r"lion: b2 must be in \[0, 1\)"),
])
def test_bad_arguments_name_the_problem(call, match):
    with pytest.raises(ValueError, match=match):
        call(small_model().parameters())


def test_argument_types_are_checked():
    with pytest.raises(TypeError, match="lamb: b1 must be a real number or a schedule"):
        optax.lamb(small_model().parameters(), 1e-3, b1="0.9")
    with pytest.raises(TypeError, match="sgd: nesterov must be True or False"):
        optax.sgd(small_model().parameters(), 1e-3, momentum=0.9, nesterov=1)


# ---- per-parameter flags inside one group, on every execution path -----------------------------

FLAGGED = {
    "adamw": (lambda ps, impl: optax.adamw(ps, 0.01, b1=0.8, b2=0.9, weight_decay=0.1, mask=MASK,
                                           impl=impl),
              ref_adamw, ("mu", "nu"),
              dict(lr=CONST(0.01), b1=0.8, b2=0.9, eps=1e-8, eps_root=0.0, wd=0.1)),
    "lamb": (lambda ps, impl: optax.lamb(ps, 0.01, weight_decay=0.1, mask=MASK, impl=impl),
             ref_lamb, ("mu", "nu"),
             dict(lr=CONST(0.01), b1=0.9, b2=0.999, eps=1e-6, eps_root=0.0, wd=0.1)),
    "lion": (lambda ps, impl: optax.lion(ps, 1e-3, weight_decay=0.1, mask=MASK, impl=impl),
             ref_lion, ("mu",), dict(lr=CONST(1e-3), b1=0.9, b2=0.99, wd=0.1)),
}
FUSED_CHAINS = {"adamw"}


def _impl_cases():
    for impl in (*engine.IMPLS, "foreach-sliced"):
        marks = [pytest.mark.slow] if impl == "compiled" else []
        for name in FLAGGED:
            yield pytest.param(name, impl, marks=marks, id=f"{name}-{impl}")


@pytest.mark.parametrize("name,impl", list(_impl_cases()))
def test_per_parameter_flags_inside_one_group_on_every_path(name, impl, monkeypatch):
    make, reference, keys, kw = FLAGGED[name]
    if impl == "foreach-sliced":  # elementwise blocks on slices of 5 elements
        monkeypatch.setattr(engine.ForeachPath, "slice_numel", 5)
        impl = "foreach"
    if impl == "fused" and name not in FUSED_CHAINS:
        with pytest.raises(ValueError, match="no fused kernel"):
            make(make_params(), impl)
        return
    opt, params = run_both(lambda ps: make(ps, impl), reference, keys, MASK, **kw)
    assert len(opt.param_groups) == 1
    assert decayed(opt) == MASK


def test_fastai_do_wd_flag_inside_one_group_on_every_eager_path():
    """fastai's own flag, set by hand in the state, on fastai's AdamW chain (`oc.Adam`)."""
    import optcraft as oc
    for impl in ("reference", "foreach", "fused", "auto"):
        params = make_params()
        opt = oc.Adam(params, lr=0.01, mom=0.8, sqr_mom=0.9, eps=1e-8, wd=0.1, impl=impl)
        for p, keep in zip(params, MASK):
            if not keep:
                opt.state[p]["do_wd"] = False
        expected = [p.detach().clone() for p in params]
        states = [{"count": 0, "mu": torch.zeros_like(p), "nu": torch.zeros_like(p)}
                  for p in expected]
        for t, gs in enumerate(gradients(4)):
            for i, (p, g) in enumerate(zip(params, gs)):
                p.grad = g.clone()
                expected[i] = ref_adamw(expected[i], g, states[i], t, CONST(0.01), 0.8, 0.9,
                                        1e-8, 0.0, 0.1, MASK[i])
            opt.step()
        assert len(opt.param_groups) == 1
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12, msg=impl)
