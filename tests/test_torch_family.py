"""torch.optim's elementwise family (optcraft.optimizers.torch_family) against torch.optim itself,
in float64, on every path: 20 steps, two parameter groups with hyperparameters of their own,
gradients missing at some steps, and a checkpoint resumed mid-run."""
import pytest
import torch

import math

from _elementwise_harness import assert_compiled, assert_same, run_per_element, train
from optcraft import compiler_hints, engine
from optcraft.optimizers import torch_family as tf


@pytest.fixture(autouse=True)
def float64_scalars():
    """torch.optim keeps NAdam's mu_product and ASGD's eta and mu as tensors of the default
    dtype: float64 here, so that torch's own numbers are float64 throughout."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


# name -> (optcraft recipe, torch.optim class, keyword arguments for both, hypers of the groups)
CASES = {
    # (torch reads initial_accumulator_value from its constructor only, not from a group)
    "Adagrad": (tf.Adagrad, torch.optim.Adagrad,
                dict(lr=0.05, lr_decay=0.01, initial_accumulator_value=0.2),
                [dict(weight_decay=0.1), dict(lr=0.1, eps=1e-6, lr_decay=0.0)]),
    "Adadelta": (tf.Adadelta, torch.optim.Adadelta, dict(lr=0.5),
                 [dict(weight_decay=0.1, rho=0.95), dict(lr=1.0, eps=1e-5)]),
    "Adamax": (tf.Adamax, torch.optim.Adamax, dict(lr=0.01),
               [dict(weight_decay=0.1), dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6)]),
    "NAdam": (tf.NAdam, torch.optim.NAdam, dict(lr=0.01),
              [dict(weight_decay=0.1), dict(lr=0.02, betas=(0.8, 0.99), momentum_decay=0.01)]),
    "NAdam-decoupled": (tf.NAdam, torch.optim.NAdam, dict(lr=0.01, decoupled_weight_decay=True),
                        [dict(weight_decay=0.1), dict(lr=0.02, weight_decay=0.3)]),
    "ASGD": (tf.ASGD, torch.optim.ASGD, dict(lr=0.05, t0=5.0),
             [dict(weight_decay=0.1), dict(lr=0.1, lambd=0.01, alpha=0.5)]),
    "Rprop": (tf.Rprop, torch.optim.Rprop, dict(lr=0.01, etas=(0.4, 1.3), step_sizes=(1e-4, 0.05)),
              [dict(), dict(lr=0.02)]),
}


def ours(name, impl):
    recipe, _, kwargs, _ = CASES[name]
    return lambda groups: recipe(groups, impl=impl, **kwargs)


def theirs(name):
    _, cls, kwargs, _ = CASES[name]
    return lambda groups: cls(groups, foreach=False, **kwargs)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("impl", ["reference", "foreach", "auto"])
def test_matches_torch(name, impl):
    hypers = CASES[name][3]
    assert_same(train(ours(name, impl), hypers), train(theirs(name), hypers))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("impl", ["reference", "foreach"])
def test_checkpoint_resumes_the_same_run(name, impl):
    hypers = CASES[name][3]
    assert_same(train(ours(name, impl), hypers, checkpoint_at=9), train(theirs(name), hypers))


@pytest.mark.parametrize("name", sorted(CASES))
def test_sliced_blocks_match_torch(name, monkeypatch):
    """The foreach path runs elementwise blocks on slices of 7 elements (large CPU tensors get
    slices of 2**20): the same numbers."""
    monkeypatch.setattr(engine.ForeachPath, "slice_numel", 7)
    hypers = CASES[name][3]
    assert_same(train(ours(name, "foreach"), hypers), train(theirs(name), hypers))


def test_adagrad_runs_as_torchs_fused_kernel(monkeypatch):
    """impl="auto" and "fused" run Adagrad as `torch._fused_adagrad_` (torch's kernel), with
    torch's numbers, checkpoint included; the decoupled decay form too."""
    calls = []
    kernel = torch._fused_adagrad_
    monkeypatch.setattr(torch, "_fused_adagrad_", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    hypers = CASES["Adagrad"][3]
    for impl in ("fused", "auto"):
        opt = ours("Adagrad", impl)([{"params": [torch.zeros(2)]}])
        assert opt.path.name == "fused"
        assert_same(train(ours("Adagrad", impl), hypers), train(theirs("Adagrad"), hypers))
    assert_same(train(ours("Adagrad", "fused"), hypers, checkpoint_at=9),
                train(theirs("Adagrad"), hypers))
    assert calls


def test_adagrad_fused_with_decoupled_decay_and_in_float32():
    """The fused path's decoupled form (a chain with `weight_decay` first) gives the foreach
    path's numbers; in float32, torch's fused Adagrad gives its single-tensor numbers."""
    from optcraft.blocks import step_stat, weight_decay
    from optcraft.blocks.elementwise import adagrad_step, sum_sqr_grad
    from optcraft.optimizer import Optimizer

    def chain(impl):
        return lambda groups: Optimizer(groups, [weight_decay, sum_sqr_grad, step_stat,
                                                 adagrad_step], lr=0.05, wd=0.1, impl=impl)
    hypers = [dict(), dict(lr=0.1)]
    assert_same(train(chain("fused"), hypers), train(chain("foreach"), hypers))
    f32 = dict(dtype=torch.float32)
    assert_same(train(ours("Adagrad", "fused"), CASES["Adagrad"][3], **f32),
                train(theirs("Adagrad"), CASES["Adagrad"][3], **f32), rtol=1e-5, atol=1e-6)


def test_torch_names_and_defaults():
    """torch's keyword names and defaults (lr included)."""
    p = [torch.zeros(2, requires_grad=True)]
    for name, cls in [("Adagrad", torch.optim.Adagrad), ("Adadelta", torch.optim.Adadelta),
                      ("Adamax", torch.optim.Adamax), ("NAdam", torch.optim.NAdam),
                      ("ASGD", torch.optim.ASGD), ("Rprop", torch.optim.Rprop)]:
        opt, ref = getattr(tf, name)(p), cls(p)
        group, ref_group = opt.param_groups[0], ref.param_groups[0]
        for key in ("lr", "eps", "betas", "weight_decay", "lr_decay", "rho", "lambd", "alpha",
                    "t0", "momentum_decay", "initial_accumulator_value"):
            if key in ref_group:
                assert group[key] == ref_group[key], (name, key)
    rprop = tf.Rprop(p)
    assert (rprop.param_groups[0]["eta_minus"], rprop.param_groups[0]["eta_plus"]) == (0.5, 1.2)
    assert (rprop.param_groups[0]["step_size_min"],
            rprop.param_groups[0]["step_size_max"]) == (1e-6, 50.0)


# ---- cautious=True against per-element references ------------------------------------------------

def masked(u, g):
    """The cautious mask of Liang et al. (2024) on one tensor, as the authors' code writes it."""
    mask = [1.0 if a * b > 0 else 0.0 for a, b in zip(u, g)]
    scale = len(mask) / (sum(mask) + 1)
    return [a * (m * scale) for a, m in zip(u, mask)]


def ref_cautious_adamax(s, p, g, h):
    lr, b1, b2, eps, wd = h["lr"], h["b1"], h["b2"], h["eps"], h["wd"]
    g = [a + wd * x for a, x in zip(g, p)]
    s["t"] = t = s.get("t", 0) + 1
    s["m"] = m = [b1 * a + (1 - b1) * b for a, b in zip(s.get("m", [0.0] * len(g)), g)]
    s["u"] = inf = [max(b2 * a, abs(b) + eps) for a, b in zip(s.get("u", [0.0] * len(g)), g)]
    u = masked([a / b / (1 - b1 ** t) for a, b in zip(m, inf)], g)
    return [x - lr * a for x, a in zip(p, u)]


def ref_cautious_nadam(s, p, g, h):
    lr, b1, b2, eps, wd, md = h["lr"], h["b1"], h["b2"], h["eps"], h["wd"], h["momentum_decay"]
    g = [a + wd * x for a, x in zip(g, p)]
    s["t"] = t = s.get("t", 0) + 1
    mu = b1 * (1 - 0.5 * 0.96 ** (t * md))
    mu_next = b1 * (1 - 0.5 * 0.96 ** ((t + 1) * md))
    s["mp"] = mp = s.get("mp", 1.0) * mu
    s["m"] = m = [b1 * a + (1 - b1) * b for a, b in zip(s.get("m", [0.0] * len(g)), g)]
    s["v"] = v = [b2 * a + (1 - b2) * b * b for a, b in zip(s.get("v", [0.0] * len(g)), g)]
    u = [((1 - mu) / (1 - mp) * gi + mu_next / (1 - mp * mu_next) * mi) /
         (math.sqrt(vi / (1 - b2 ** t)) + eps) for gi, mi, vi in zip(g, m, v)]
    u = masked(u, g)
    return [x - lr * a for x, a in zip(p, u)]


H = dict(lr=0.01, b1=0.9, b2=0.999, eps=1e-8, wd=0.1, momentum_decay=4e-3)
CAUTIOUS = {
    "Adamax": (ref_cautious_adamax, [({}, H), ({"lr": 0.02, "wd": 0.0, "betas": (0.8, 0.99)},
                                              {**H, "lr": 0.02, "wd": 0.0, "b1": 0.8,
                                               "b2": 0.99})]),
    "NAdam": (ref_cautious_nadam, [({}, H), ({"lr": 0.02, "momentum_decay": 0.01},
                                             {**H, "lr": 0.02, "momentum_decay": 0.01})]),
}


@pytest.mark.parametrize("name", sorted(CAUTIOUS))
@pytest.mark.parametrize("impl", ["reference", "foreach"])
def test_cautious_against_per_element_reference(name, impl):
    ref_step, hypers = CAUTIOUS[name]
    recipe = getattr(tf, name)

    def ours(groups):
        return recipe(groups, lr=0.01, weight_decay=0.1, cautious=True, impl=impl)
    assert_same(train(ours, [h for h, _ in hypers]),
                run_per_element(ref_step, [r for _, r in hypers]))
    assert_same(train(ours, [h for h, _ in hypers], checkpoint_at=9),
                run_per_element(ref_step, [r for _, r in hypers]))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["Adagrad", "NAdam", "ASGD", "Rprop"])
def test_compiled_path_matches_torch(name, monkeypatch):
    monkeypatch.setattr(compiler_hints, "PER_TENSOR_MIN_NUMEL", 10)
    hypers, opts = CASES[name][3], []
    assert_same(train(ours(name, "compiled"), hypers, n_steps=8, opts=opts),
                train(theirs(name), hypers, n_steps=8), rtol=1e-6, atol=1e-10)
    assert_compiled(opts[0])
