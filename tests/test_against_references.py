"""The named optimizers against independent references.

* torch.optim on a small real model (a conv net on scikit-learn's digits), 60 steps, float64:
  Adam(decouple_wd=True) = AdamW, Adam(decouple_wd=False) = Adam with weight_decay,
  SGD with momentum and L2 = SGD, RMSProp(mom=0) = RMSprop.
* RAdam, QHAdam, Larc, Lamb, Lookahead and ranger against per-element references written here
  from the seed's formulas with Python floats, over several steps and several groups.
"""
import math
import random
from functools import partial

import pytest
import torch

import optcraft as oc


# ---- against torch.optim on a real model ------------------------------------------------------------

def digits_batches(n_steps, batch=32, seed=0):
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float64).view(-1, 1, 8, 8) / 16
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    for i in range(n_steps):
        idx = order[(i * batch) % (len(x) - batch):][:batch]
        yield x[idx], y[idx]


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(8 * 64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)).double()


def train(make_opt, n_steps=60, groups=False):
    model = make_model()
    if groups:  # two groups: the conv layer at a tenth of the head's lr
        params = [{"params": model[0].parameters(), "lr_scale": 0.1},
                  {"params": list(model[3].parameters()) + list(model[5].parameters())}]
    else:
        params = model.parameters()
    opt = make_opt(params)
    for x, y in digits_batches(n_steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def assert_same_training(ours, theirs, rtol=1e-9, atol=1e-12):
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def groups_for_torch(params, lr):
    """Turn our two-group spec into torch's per-group lr."""
    return [{"params": g["params"], "lr": lr * g.get("lr_scale", 1.0)} for g in params]


def groups_for_optcraft(params, lr):
    return [[*g["params"]] for g in params], [lr * g.get("lr_scale", 1.0) for g in params]


CASES = {
    "adamw": (lambda ps, lr: oc.Adam(ps, lr=lr, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.1),
              lambda ps, lr: torch.optim.AdamW(ps, lr=lr, betas=(0.9, 0.99), eps=1e-5,
                                               weight_decay=0.1), 1e-3),
    "adam_l2": (lambda ps, lr: oc.Adam(ps, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1,
                                       decouple_wd=False),
                lambda ps, lr: torch.optim.Adam(ps, lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                                weight_decay=0.1), 1e-3),
    "sgd_momentum_l2": (lambda ps, lr: oc.SGD(ps, lr=lr, mom=0.9, wd=1e-2, decouple_wd=False),
                        lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9, weight_decay=1e-2),
                        0.05),
    "sgd_plain": (lambda ps, lr: oc.SGD(ps, lr=lr),
                  lambda ps, lr: torch.optim.SGD(ps, lr=lr), 0.1),
    "rmsprop": (lambda ps, lr: oc.RMSProp(ps, lr=lr, sqr_mom=0.9, mom=0.0, wd=1e-2,
                                          decouple_wd=False),
                lambda ps, lr: torch.optim.RMSprop(ps, lr=lr, alpha=0.9, eps=1e-8,
                                                   weight_decay=1e-2), 1e-3),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("impl", ["auto", "foreach", "reference"])
def test_matches_torch_on_a_real_model(case, impl):
    ours, theirs, lr = CASES[case]
    a = train(lambda ps: _with_impl(ours(ps, lr), impl))
    b = train(lambda ps: theirs(ps, lr))
    assert_same_training(a, b)


@pytest.mark.parametrize("case", ["adamw", "sgd_momentum_l2"])
def test_matches_torch_with_two_groups(case):
    ours, theirs, lr = CASES[case]

    def make_ours(params):
        lists, lrs = groups_for_optcraft(params, lr)
        opt = ours(lists, lr)
        opt.set_hyper("lr", lrs)
        return opt

    a = train(make_ours, groups=True)
    b = train(lambda ps: theirs(groups_for_torch(ps, lr), lr), groups=True)
    assert_same_training(a, b)


def _with_impl(opt, impl):
    opt.impl = impl
    return opt


# ---- per-element references from the seed's formulas ---------------------------------------------

def debias(mom, damp, step):
    return damp * (1 - mom ** step) / (1 - mom)


class Reference:
    """A parameter tensor as a list of floats, with its state, stepped by a formula."""

    def __init__(self, values):
        self.p = list(values)
        self.state = {}


def ref_adam_stats(ref, g, h, dampening_mom=True):
    s = ref.state
    s.setdefault("m", [0.0] * len(g))
    s.setdefault("v", [0.0] * len(g))
    s["step"] = s.get("step", 0) + 1
    mom, sqr_mom = h["mom"], h["sqr_mom"]
    s["m"] = [mom * m + ((1 - mom) if dampening_mom else 1) * gi for m, gi in zip(s["m"], g)]
    s["v"] = [sqr_mom * v + (1 - sqr_mom) * gi * gi for v, gi in zip(s["v"], g)]


def ref_decoupled_wd(ref, h):
    ref.p = [x * (1 - h["lr"] * h["wd"]) for x in ref.p]


def ref_radam(ref, g, h):
    ref_decoupled_wd(ref, h)
    ref_adam_stats(ref, g, h)
    s, mom, sqr_mom, lr, eps = ref.state, h["mom"], h["sqr_mom"], h["lr"], h["eps"]
    t = s["step"]
    d1, d2 = 1 - mom ** t, 1 - sqr_mom ** t
    r_inf = 2 / (1 - sqr_mom) - 1
    r = r_inf - 2 * t * sqr_mom ** t / (1 - sqr_mom ** t)
    if r > 5:
        v = math.sqrt((r - 4) * (r - 2) * r_inf / ((r_inf - 4) * (r_inf - 2) * r))
        out = []
        for x, m, vv in zip(ref.p, s["m"], s["v"]):
            denom = math.sqrt(vv / d2) + eps
            if h.get("beta", 0):
                b = h["beta"]
                denom = math.log1p(math.exp(b * denom)) / b if b * denom <= 20 else denom
            out.append(x - lr * v * (m / d1) / denom)
        ref.p = out
    else:
        ref.p = [x - lr * m / d1 for x, m in zip(ref.p, s["m"])]


def ref_qhadam(ref, g, h):
    ref_decoupled_wd(ref, h)
    ref_adam_stats(ref, g, h)
    s, t = ref.state, ref.state["step"]
    d1, d2 = 1 - h["mom"] ** t, 1 - h["sqr_mom"] ** t
    nu1, nu2 = h["nu_1"], h["nu_2"]
    ref.p = [x - h["lr"] * ((1 - nu1) * gi + nu1 * m / d1) /
             (math.sqrt((1 - nu2) * gi * gi + nu2 * v / d2) + h["eps"])
             for x, gi, m, v in zip(ref.p, g, s["m"], s["v"])]


def norm(xs):
    return math.sqrt(sum(x * x for x in xs))


def ref_larc(ref, g, h, clip=True):
    # local lr from the norms before weight decay (fastai's larc_layer_lr runs after it, but on
    # the decayed weights: weight_decay is first in the chain)
    ref_decoupled_wd(ref, h)
    p_norm, g_norm = norm(ref.p), norm(g)
    local_lr = h["lr"] * h["trust_coeff"] * p_norm / (g_norm + p_norm * h["wd"] + h["eps"])
    if clip:
        local_lr = min(local_lr, h["lr"])
    s = ref.state
    s.setdefault("m", [0.0] * len(g))
    s["m"] = [h["mom"] * m + gi for m, gi in zip(s["m"], g)]
    ref.p = [x - local_lr * m for x, m in zip(ref.p, s["m"])]


def rms(xs):
    return math.sqrt(sum(x * x for x in xs) / len(xs))


def ref_lamb(ref, g, h):
    ref_decoupled_wd(ref, h)
    ref_adam_stats(ref, g, h)
    s, t = ref.state, ref.state["step"]
    d1, d2 = 1 - h["mom"] ** t, 1 - h["sqr_mom"] ** t
    u = [(m / d1) / (math.sqrt(v / d2) + h["eps"]) for m, v in zip(s["m"], s["v"])]
    r1, r2 = rms(ref.p), rms(u)
    q = 1.0 if r1 == 0 or r2 == 0 else min(r1 / r2, 10)
    ref.p = [x - h["lr"] * q * ui for x, ui in zip(ref.p, u)]


def ref_sgd(ref, g, h):
    ref.p = [x - h["lr"] * gi for x, gi in zip(ref.p, g)]


def run_reference(step_fn, groups_init, grads, hypers, lookahead=None):
    refs = [[Reference(v) for v in group] for group in groups_init]
    slow = [[list(r.p) for r in group] for group in refs]
    for t, step_grads in enumerate(grads, start=1):
        for gi, group in enumerate(refs):
            for pi, ref in enumerate(group):
                g = step_grads[gi][pi]
                if g is not None:
                    step_fn(ref, g, hypers[gi])
        if lookahead and t % lookahead[0] == 0:
            alpha = lookahead[1]
            for gi, group in enumerate(refs):
                for pi, ref in enumerate(group):
                    slow[gi][pi] = [s + alpha * (x - s) for s, x in zip(slow[gi][pi], ref.p)]
                    ref.p = list(slow[gi][pi])
    return [[r.p for r in group] for group in refs]


def run_optcraft(make, groups_init, grads, impl="auto"):
    params = [[torch.tensor(v, dtype=torch.float64) for v in group] for group in groups_init]
    opt = make(params)
    if hasattr(opt, "impl"):
        opt.impl = impl
    elif hasattr(opt, "opt"):
        opt.opt.impl = impl
    for step_grads in grads:
        for group, gs in zip(params, step_grads):
            for p, g in zip(group, gs):
                p.grad = None if g is None else torch.tensor(g, dtype=torch.float64)
        opt.step()
    return [[p.tolist() for p in group] for group in params]


def random_problem(n_steps, seed=0, sizes=((3, 2), (4,)), none_every=4):
    rnd = random.Random(seed)
    groups_init = [[[rnd.uniform(-1, 1) for _ in range(n)] for n in group] for group in sizes]
    grads = []
    for t in range(n_steps):
        step = []
        for gi, group in enumerate(sizes):
            row = []
            for pi, n in enumerate(group):
                # some parameters have no gradient at some steps
                skip = none_every and (t + gi + pi) % none_every == none_every - 1 and t > 0
                row.append(None if skip else [rnd.gauss(0, 1) for _ in range(n)])
            step.append(row)
        grads.append(step)
    return groups_init, grads


def assert_close_nested(a, b, rel=1e-9, abs_=1e-12):
    for ga, gb in zip(a, b):
        for pa, pb in zip(ga, gb):
            assert pa == pytest.approx(pb, rel=rel, abs=abs_)


FORMULA_CASES = {
    "radam": (ref_radam, lambda ps, lr: oc.RAdam(ps, lr=lr, wd=0.01),
              dict(mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.01)),
    "radam_sadam_beta": (ref_radam, lambda ps, lr: oc.RAdam(ps, lr=lr, beta=50.0),
                         dict(mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.0, beta=50.0)),
    "qhadam": (ref_qhadam, lambda ps, lr: oc.QHAdam(ps, lr=lr, wd=0.01),
               dict(mom=0.999, sqr_mom=0.999, nu_1=0.7, nu_2=1.0, eps=1e-8, wd=0.01)),
    "qhadam_nu2": (ref_qhadam, lambda ps, lr: oc.QHAdam(ps, lr=lr, mom=0.9, sqr_mom=0.99,
                                                         nu_2=0.5),
                   dict(mom=0.9, sqr_mom=0.99, nu_1=0.7, nu_2=0.5, eps=1e-8, wd=0.0)),
    "larc": (ref_larc, lambda ps, lr: oc.Larc(ps, lr=lr, wd=0.01),
             dict(mom=0.9, trust_coeff=0.02, eps=1e-8, wd=0.01)),
    "lars": (lambda r, g, h: ref_larc(r, g, h, clip=False),
             lambda ps, lr: oc.Larc(ps, lr=lr, clip=False, trust_coeff=0.5),
             dict(mom=0.9, trust_coeff=0.5, eps=1e-8, wd=0.0)),
    "lamb": (ref_lamb, lambda ps, lr: oc.Lamb(ps, lr=lr, wd=0.01),
             dict(mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.01)),
    # lamb_step alone, without a lamb_trust_ratio block before it, works the ratio out itself
    "lamb_step_alone": (ref_lamb, lambda ps, lr: oc.Optimizer(
        ps, [oc.weight_decay, partial(oc.average_grad, dampening=True), oc.average_sqr_grad,
             oc.step_stat, oc.lamb_step], lr=lr, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.01),
        dict(mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.01)),
}


def test_lamb_trust_ratio_is_the_papers_ratio():
    """`lamb_trust_ratio` on one tensor (the seed's calling convention): the update
    u = m_hat / (sqrt(v_hat) + eps) and min(rms(p) / rms(u), 10), 1 where a norm is 0 (an
    all-zero parameter).  Lamb hands both to `lamb_step` and keeps neither in its state."""
    p0, g = [0.5, -1.0, 2.0, 0.25], [0.1, -0.3, 0.2, 0.05]
    h = dict(mom=0.9, sqr_mom=0.99, eps=1e-5)
    m = [(1 - h["mom"]) * gi for gi in g]
    v = [(1 - h["sqr_mom"]) * gi * gi for gi in g]
    u = [(mi / (1 - h["mom"])) / (math.sqrt(vi / (1 - h["sqr_mom"])) + h["eps"])
         for mi, vi in zip(m, v)]
    f64 = partial(torch.tensor, dtype=torch.float64)
    p = f64(p0)
    p.grad = f64(g)
    out = oc.lamb_trust_ratio(p, step=1, grad_avg=f64(m), sqr_avg=f64(v), **h)
    assert out["lamb_update"].tolist() == pytest.approx(u, rel=1e-12)
    assert float(out["trust_ratio"]) == pytest.approx(min(rms(p0) / rms(u), 10), rel=1e-12)
    zero = torch.zeros(4, dtype=torch.float64)
    zero.grad = f64(g)
    assert float(oc.lamb_trust_ratio(zero, step=1, grad_avg=f64(m), sqr_avg=f64(v),
                                     **h)["trust_ratio"]) == 1.0
    opt = oc.Lamb([p], lr=0.1)
    opt.step()
    assert set(opt.state[p]) == {"grad_avg", "sqr_avg", "step"}


@pytest.mark.parametrize("case", sorted(FORMULA_CASES))
@pytest.mark.parametrize("impl", ["foreach", "reference"])
def test_against_formula(case, impl):
    ref_step, make, h = FORMULA_CASES[case]
    lrs = [0.01, 0.05]  # two groups, two learning rates
    groups_init, grads = random_problem(12)

    def make_two_groups(params):
        opt = make(params, lrs[-1])
        opt.set_hyper("lr", lrs)
        return opt

    ours = run_optcraft(make_two_groups, groups_init, grads, impl)
    theirs = run_reference(ref_step, groups_init, grads, [{**h, "lr": lr} for lr in lrs])
    assert_close_nested(ours, theirs)


def test_lookahead_against_formula():
    groups_init, grads = random_problem(14, seed=3)
    h = [{"lr": 0.1}, {"lr": 0.3}]

    def make(params):
        return oc.Lookahead(oc.SGD(params, lr=[0.1, 0.3]), k=5, alpha=0.3)

    ours = run_optcraft(make, groups_init, grads)
    theirs = run_reference(ref_sgd, groups_init, grads, h, lookahead=(5, 0.3))
    assert_close_nested(ours, theirs)


def test_ranger_against_formula():
    groups_init, grads = random_problem(15, seed=5)
    h = dict(mom=0.95, sqr_mom=0.99, eps=1e-6, wd=0.01)

    def make(params):
        return oc.ranger(params, lr=[0.01, 0.02])

    ours = run_optcraft(make, groups_init, grads)
    theirs = run_reference(ref_radam, groups_init, grads,
                           [{**h, "lr": 0.01}, {**h, "lr": 0.02}], lookahead=(6, 0.5))
    assert_close_nested(ours, theirs)
