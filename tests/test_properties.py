"""Property-based tests (hypothesis): random shapes (0-d, empty, non-contiguous), random group
layouts and random missing gradients; every eager impl agrees with "reference" (the
per-parameter path), and the reference agrees with torch.optim where torch has the algorithm."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import optcraft as oc

OPTIMIZERS = {
    "SGD": lambda ps: oc.SGD(ps, lr=0.1, mom=0.9, wd=0.01),
    "SGD-l2": lambda ps: oc.SGD(ps, lr=0.1, mom=0.9, wd=0.01, decouple_wd=False),
    "RMSProp": lambda ps: oc.RMSProp(ps, lr=0.01, mom=0.5),
    "Adam": lambda ps: oc.Adam(ps, lr=0.01, wd=0.1),
    "RAdam": lambda ps: oc.RAdam(ps, lr=0.01, sqr_mom=0.9),
    "QHAdam": lambda ps: oc.QHAdam(ps, lr=0.01),
    "Larc": lambda ps: oc.Larc(ps, lr=0.1, wd=0.01),
    "Lamb": lambda ps: oc.Lamb(ps, lr=0.01, wd=0.01),
}

shape = st.one_of(
    st.just(()),                                               # 0-d
    st.tuples(st.integers(0, 3)),                              # 1-d, maybe empty
    st.tuples(st.integers(1, 3), st.integers(0, 4)),           # 2-d, maybe empty
    st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3)),
)


@st.composite
def problems(draw):
    specs = draw(st.lists(st.tuples(shape, st.booleans()), min_size=1, max_size=6))
    n_groups = draw(st.integers(1, min(3, len(specs))))
    cuts = sorted(draw(st.lists(st.integers(1, len(specs) - 1), min_size=n_groups - 1,
                                max_size=n_groups - 1, unique=True))) if len(specs) > 1 else []
    n_steps = draw(st.integers(1, 4))
    missing = draw(st.lists(st.lists(st.booleans(), min_size=len(specs), max_size=len(specs)),
                            min_size=n_steps, max_size=n_steps))
    seed = draw(st.integers(0, 2 ** 16))
    name = draw(st.sampled_from(sorted(OPTIMIZERS)))
    return specs, cuts, missing, seed, name


def make_params(specs, cuts, seed):
    g = torch.Generator().manual_seed(seed)
    params = []
    for shp, transposed in specs:
        if transposed and len(shp) >= 2:
            # a non-contiguous leaf: the transpose of a tensor with the last two sizes swapped
            swapped = (*shp[:-2], shp[-1], shp[-2])
            t = torch.randn(swapped, generator=g, dtype=torch.float64).transpose(-1, -2)
        else:
            t = torch.randn(shp, generator=g, dtype=torch.float64)
        params.append(t.requires_grad_())
    bounds = [0, *cuts, len(params)]
    return params, [params[a:b] for a, b in zip(bounds, bounds[1:])]


def run(name, impl, specs, cuts, missing, seed):
    params, groups = make_params(specs, cuts, seed)
    opt = OPTIMIZERS[name](groups if len(groups) > 1 else params)
    opt.impl = impl
    g = torch.Generator().manual_seed(seed + 1)
    for step_missing in missing:
        for p, miss in zip(params, step_missing):
            grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.grad = None if miss else grad
        opt.step()
    return params, opt


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from(["foreach", "auto"]))
def test_every_impl_agrees_with_reference(problem, impl):
    specs, cuts, missing, seed, name = problem
    ref_params, ref_opt = run(name, "reference", specs, cuts, missing, seed)
    params, opt = run(name, impl, specs, cuts, missing, seed)
    for a, b in zip(params, ref_params):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
    for a, b in zip(params, ref_params):
        assert opt.state[a].keys() == ref_opt.state[b].keys()
        for k, v in ref_opt.state[b].items():
            w = opt.state[a][k]
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(w, v, rtol=1e-6, atol=1e-12)
            else:
                assert w == v


@settings(max_examples=30, deadline=None)
@given(problems())
def test_adam_reference_agrees_with_torch_adamw(problem):
    specs, cuts, missing, seed, _ = problem
    params, groups = make_params(specs, cuts, seed)
    ours = oc.Adam(params, lr=0.01, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.1, impl="reference")
    twins, _ = make_params(specs, cuts, seed)
    theirs = torch.optim.AdamW(twins, lr=0.01, betas=(0.9, 0.99), eps=1e-5, weight_decay=0.1)
    g = torch.Generator().manual_seed(seed + 1)
    for step_missing in missing:
        for p, q, miss in zip(params, twins, step_missing):
            grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.grad = None if miss else grad
            q.grad = None if miss else grad.clone()
        ours.step()
        theirs.step()
    for a, b in zip(params, twins):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
