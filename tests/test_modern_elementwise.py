"""The modern elementwise optimizers (optcraft.optimizers.modern) and Cautious masking against
their references, in float64, on every path: 20 steps, two parameter groups with
hyperparameters of their own, gradients missing at some steps, a checkpoint resumed mid-run.

* Lion against the `lion-pytorch` package, ADOPT against `torch-adopt`, Adan with
  `first_step_moments=False` against `adan-pytorch`;
* Adan (the authors' algorithm), MARS and every `cautious=True` against per-element references
  written here with Python floats from the papers (and, for the cautious mask, the authors'
  code: `mask = (u * g > 0)`, `u * mask * numel / (sum(mask) + 1)`).
"""
import math

import pytest
import torch

from _elementwise_harness import assert_compiled, assert_same, run_per_element, train
import optcraft as oc
from optcraft import compiler_hints, engine
from optcraft.optimizers import modern

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:adopt",
                                        "ignore::UserWarning:adopt")

adopt = pytest.importorskip("adopt")
adan_pytorch = pytest.importorskip("adan_pytorch")
lion_pytorch = pytest.importorskip("lion_pytorch")


@pytest.fixture(autouse=True)
def float64_scalars():
    """torch-adopt keeps its step count as a tensor of the default dtype: float64 here."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


# ---- against the packages -----------------------------------------------------------------------

# name -> (optcraft builder, package builder, hypers of the two groups); both take the groups
PACKAGE_CASES = {
    "Lion": (lambda gs, impl: modern.Lion(gs, lr=1e-3, weight_decay=0.5, impl=impl),
             lambda gs: lion_pytorch.Lion(gs, lr=1e-3, weight_decay=0.5),
             [dict(), dict(lr=3e-3, betas=(0.8, 0.95), weight_decay=0.0)]),
    "Lion-decoupled": (lambda gs, impl: modern.Lion(gs, lr=1e-3, weight_decay=1e-3,
                                                    decoupled_weight_decay=True, impl=impl),
                       lambda gs: lion_pytorch.Lion(gs, lr=1e-3, weight_decay=1e-3,
                                                    decoupled_weight_decay=True),
                       [dict(), dict(lr=3e-3, weight_decay=2e-3)]),
    "ADOPT": (lambda gs, impl: modern.ADOPT(gs, lr=1e-2, weight_decay=0.1, impl=impl),
              lambda gs: adopt.ADOPT(gs, lr=1e-2, weight_decay=0.1),
              [dict(), dict(lr=2e-2, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.0)]),
    "ADOPT-decoupled": (lambda gs, impl: modern.ADOPT(gs, lr=1e-2, weight_decay=0.1, decouple=True,
                                                      impl=impl),
                        lambda gs: adopt.ADOPT(gs, lr=1e-2, weight_decay=0.1, decouple=True),
                        [dict(), dict(lr=2e-2, weight_decay=0.3)]),
    "ADOPT-no-clip": (lambda gs, impl: modern.ADOPT(gs, lr=1e-2, clip_lambda=None, impl=impl),
                      lambda gs: adopt.ADOPT(gs, lr=1e-2, clip_lambda=None),
                      [dict(), dict(lr=2e-2, betas=(0.5, 0.9))]),
    # the package's first step (no moment update) behind first_step_moments=False
    "Adan-package": (lambda gs, impl: modern.Adan(gs, lr=1e-2, weight_decay=0.02,
                                                  first_step_moments=False, impl=impl),
                     lambda gs: adan_pytorch.Adan(gs, lr=1e-2, weight_decay=0.02),
                     [dict(), dict(lr=2e-2, weight_decay=0.1, eps=1e-6)]),
}


@pytest.mark.parametrize("name", sorted(PACKAGE_CASES))
@pytest.mark.parametrize("impl", ["reference", "foreach"])
def test_matches_the_package(name, impl):
    ours, theirs, hypers = PACKAGE_CASES[name]
    assert_same(train(lambda gs: ours(gs, impl), hypers), train(theirs, hypers))


@pytest.mark.parametrize("name", sorted(PACKAGE_CASES))
def test_checkpoint_resumes_the_same_run(name):
    ours, theirs, hypers = PACKAGE_CASES[name]
    assert_same(train(lambda gs: ours(gs, "foreach"), hypers, checkpoint_at=9),
                train(theirs, hypers))


@pytest.mark.parametrize("name", ["Lion", "ADOPT", "Adan-package"])
def test_sliced_blocks_match_the_package(name, monkeypatch):
    """The foreach path runs elementwise blocks on slices of 7 elements: the same numbers."""
    monkeypatch.setattr(engine.ForeachPath, "slice_numel", 7)
    ours, theirs, hypers = PACKAGE_CASES[name]
    assert_same(train(lambda gs: ours(gs, "foreach"), hypers), train(theirs, hypers))


def test_packages_names_and_defaults():
    p = [torch.zeros(2, requires_grad=True)]
    lion, ref = modern.Lion(p), lion_pytorch.Lion(p)
    assert (lion.param_groups[0]["lr"], lion.param_groups[0]["betas"],
            lion.param_groups[0]["weight_decay"]) == (ref.param_groups[0]["lr"],
                                                      ref.param_groups[0]["betas"],
                                                      ref.param_groups[0]["weight_decay"])
    ours, ref = modern.ADOPT(p), adopt.ADOPT(p)
    for key in ("lr", "betas", "eps", "weight_decay"):
        assert ours.param_groups[0][key] == ref.param_groups[0][key], key
    ours, ref = modern.Adan(p), adan_pytorch.Adan(p)
    group = ours.param_groups[0]
    assert (group["lr"], group["eps"], group["wd"]) == (ref.param_groups[0]["lr"],
                                                       ref.param_groups[0]["eps"],
                                                       ref.param_groups[0]["weight_decay"])
    assert (1 - group["mom"], 1 - group["diff_mom"], 1 - group["sqr_mom"]) == \
        pytest.approx(ref.param_groups[0]["betas"], rel=1e-12)
    mars = modern.MARS(p).param_groups[0]
    assert (mars["lr"], mars["betas"], mars["eps"], mars["wd"], mars["gamma"]) == \
        (3e-3, (0.95, 0.99), 1e-8, 0.0, 0.025)


# ---- per-element references ---------------------------------------------------------------------

def sign(x):
    return float((x > 0) - (x < 0))


def masked(u, g):
    """The authors' cautious mask on one tensor."""
    mask = [1.0 if a * b > 0 else 0.0 for a, b in zip(u, g)]
    scale = len(mask) / (sum(mask) + 1)
    return [a * (m * scale) for a, m in zip(u, mask)]


def ref_adamw(s, p, g, h, cautious=False):
    lr, b1, b2, eps, wd = h["lr"], h["b1"], h["b2"], h["eps"], h["wd"]
    p = [x * (1 - lr * wd) for x in p]
    s["t"] = t = s.get("t", 0) + 1
    s["m"] = m = [b1 * a + (1 - b1) * b for a, b in zip(s.get("m", [0.0] * len(g)), g)]
    s["v"] = v = [b2 * a + (1 - b2) * b * b for a, b in zip(s.get("v", [0.0] * len(g)), g)]
    u = [(a / (1 - b1 ** t)) / (math.sqrt(b / (1 - b2 ** t)) + eps) for a, b in zip(m, v)]
    if cautious:
        u = masked(u, g)
    return [x - lr * a for x, a in zip(p, u)]


def ref_lion(s, p, g, h, cautious=False):
    lr, b1, b2, wd = h["lr"], h["b1"], h["b2"], h["wd"]
    p = [x * (1 - lr * wd) for x in p]
    m = s.get("m", [0.0] * len(g))
    u = [sign(b1 * a + (1 - b1) * b) for a, b in zip(m, g)]
    if cautious:
        u = masked(u, g)
    s["m"] = [b2 * a + (1 - b2) * b for a, b in zip(m, g)]
    return [x - lr * a for x, a in zip(p, u)]


def ref_adan(s, p, g, h, cautious=False):
    """Adan as the authors' code computes the paper's Algorithm 1, betas as weights of the new
    term: the first step's gradient difference is 0 and every moment is updated from the first
    step; the moments start at 0, with bias corrections (the paper starts them at the first
    gradient)."""
    lr, b1, b2, b3, eps, wd = h["lr"], h["b1"], h["b2"], h["b3"], h["eps"], h["wd"]
    s["t"] = t = s.get("t", 0) + 1
    d = [a - b for a, b in zip(g, s.get("prev", g))]
    s["prev"] = g
    zeros = [0.0] * len(g)
    s["m"] = m = [(1 - b1) * a + b1 * b for a, b in zip(s.get("m", zeros), g)]
    s["v"] = v = [(1 - b2) * a + b2 * b for a, b in zip(s.get("v", zeros), d)]
    s["n"] = n = [(1 - b3) * a + b3 * (b + (1 - b2) * c) ** 2
                  for a, b, c in zip(s.get("n", zeros), g, d)]
    c1, c2, c3 = (1 - (1 - b1) ** t), (1 - (1 - b2) ** t), (1 - (1 - b3) ** t)
    u = [(a / c1 + (1 - b2) * b / c2) / (math.sqrt(c / c3) + eps) for a, b, c in zip(m, v, n)]
    if cautious:
        u = masked(u, g)
    return [(x - lr * a) / (1 + lr * wd) for x, a in zip(p, u)]


def ref_mars(s, p, g, h, cautious=False):
    """MARS-AdamW (Yuan et al., 2024, Algorithm 2, approximate form): the corrected gradient
    c = g + gamma * b1 / (1 - b1) * (g - g_prev) (g_prev = g at the first step: x_1 = x_0),
    scaled to norm 1 where its norm exceeds 1, then AdamW on c."""
    gamma, b1 = h["gamma"], h["b1"]
    prev = s.get("prev", g)
    c = [a + gamma * b1 / (1 - b1) * (a - b) for a, b in zip(g, prev)]
    s["prev"] = g
    norm = math.sqrt(sum(a * a for a in c))
    if norm > 1:
        c = [a / norm for a in c]
    return ref_adamw(s, p, c, h, cautious)


def ref_adopt(s, p, g, h, cautious=False):
    lr, b1, b2, eps, wd, decouple = h["lr"], h["b1"], h["b2"], h["eps"], h["wd"], h["decouple"]
    if not decouple:
        g = [a + wd * x for a, x in zip(g, p)]
    if "v" not in s:
        s["v"], s["m"], s["k"] = [a * a for a in g], [0.0] * len(g), 1
        return p
    if decouple:
        p = [x * (1 - lr * wd) for x in p]
    clip = s["k"] ** 0.25
    normed = [min(max(a / max(math.sqrt(v), eps), -clip), clip) for a, v in zip(g, s["v"])]
    s["m"] = u = [b1 * m + (1 - b1) * n for m, n in zip(s["m"], normed)]
    if cautious:
        u = masked(u, g)
    s["v"] = [b2 * v + (1 - b2) * a * a for v, a in zip(s["v"], g)]
    s["k"] += 1
    return [x - lr * a for x, a in zip(p, u)]


ADAM_H = dict(lr=1e-2, b1=0.9, b2=0.99, eps=1e-8, wd=0.1)
LION_H = dict(lr=1e-3, b1=0.9, b2=0.99, wd=0.5)
ADAN_H = dict(lr=1e-2, b1=0.02, b2=0.08, b3=0.01, eps=1e-8, wd=0.02)
MARS_H = dict(lr=3e-3, b1=0.95, b2=0.99, eps=1e-8, wd=0.1, gamma=0.025)
ADOPT_H = dict(lr=1e-2, b1=0.9, b2=0.9999, eps=1e-6, wd=0.1, decouple=False)

# name -> (optcraft builder of the groups, per-element step, hypers of the two groups, each the
# optcraft group's keywords and the reference's values)
FORMULA_CASES = {
    "Adan": (lambda gs, impl: modern.Adan(gs, lr=1e-2, weight_decay=0.02, impl=impl), ref_adan,
             [({}, ADAN_H), ({"lr": 2e-2, "wd": 0.1, "eps": 1e-6},
                             {**ADAN_H, "lr": 2e-2, "wd": 0.1, "eps": 1e-6})]),
    "MARS": (lambda gs, impl: modern.MARS(gs, lr=3e-3, weight_decay=0.1, impl=impl), ref_mars,
             [({}, MARS_H), ({"lr": 1e-2, "gamma": 0.5, "betas": (0.9, 0.95)},
                             {**MARS_H, "lr": 1e-2, "gamma": 0.5, "b1": 0.9, "b2": 0.95})]),
    "Adam-cautious": (lambda gs, impl: oc.Adam(gs, lr=1e-2, betas=(0.9, 0.99), eps=1e-8,
                                               weight_decay=0.1, cautious=True, impl=impl),
                      lambda *a: ref_adamw(*a, cautious=True),
                      [({}, ADAM_H), ({"lr": 3e-2, "wd": 0.0}, {**ADAM_H, "lr": 3e-2, "wd": 0.0})]),
    "Lion-cautious": (lambda gs, impl: modern.Lion(gs, lr=1e-3, weight_decay=0.5, cautious=True,
                                                   impl=impl),
                      lambda *a: ref_lion(*a, cautious=True),
                      [({}, LION_H), ({"lr": 3e-3, "betas": (0.8, 0.95)},
                                      {**LION_H, "lr": 3e-3, "b1": 0.8, "b2": 0.95})]),
    "ADOPT-cautious": (lambda gs, impl: modern.ADOPT(gs, lr=1e-2, weight_decay=0.1, cautious=True,
                                                     impl=impl),
                       lambda *a: ref_adopt(*a, cautious=True),
                       [({}, ADOPT_H), ({"lr": 2e-2, "eps": 1e-3},
                                        {**ADOPT_H, "lr": 2e-2, "eps": 1e-3})]),
    "Adan-cautious": (lambda gs, impl: modern.Adan(gs, lr=1e-2, weight_decay=0.02, cautious=True,
                                                   impl=impl),
                      lambda *a: ref_adan(*a, cautious=True),
                      [({}, ADAN_H), ({"lr": 2e-2}, {**ADAN_H, "lr": 2e-2})]),
    "MARS-cautious": (lambda gs, impl: modern.MARS(gs, lr=3e-3, weight_decay=0.1, cautious=True,
                                                   impl=impl),
                      lambda *a: ref_mars(*a, cautious=True),
                      [({}, MARS_H), ({"lr": 1e-2, "gamma": 0.5},
                                      {**MARS_H, "lr": 1e-2, "gamma": 0.5})]),
}


@pytest.mark.parametrize("name", sorted(FORMULA_CASES))
@pytest.mark.parametrize("impl", ["reference", "foreach"])
def test_against_per_element_reference(name, impl):
    ours, ref_step, hypers = FORMULA_CASES[name]
    assert_same(train(lambda gs: ours(gs, impl), [h for h, _ in hypers]),
                run_per_element(ref_step, [r for _, r in hypers]))


@pytest.mark.parametrize("name", sorted(FORMULA_CASES))
def test_checkpoint_resumes_the_reference_run(name):
    ours, ref_step, hypers = FORMULA_CASES[name]
    assert_same(train(lambda gs: ours(gs, "foreach"), [h for h, _ in hypers], checkpoint_at=9),
                run_per_element(ref_step, [r for _, r in hypers]))


def test_mars_leaves_a_corrected_gradient_of_norm_below_one_as_it_is():
    """With small gradients the corrected gradient's norm stays below 1 and is not scaled (the
    cases above, with unit gradients, are scaled at every step)."""
    g = torch.Generator().manual_seed(3)
    p = torch.randn(6, generator=g, dtype=torch.float64).requires_grad_()
    ref_p, state, h = p.detach().tolist(), {}, {**MARS_H, "lr": 1e-2}
    opt = modern.MARS([p], lr=1e-2, weight_decay=0.1)
    for _ in range(10):
        grad = torch.randn(6, generator=g, dtype=torch.float64) * 0.05
        p.grad = grad
        opt.step()
        ref_p = ref_mars(state, ref_p, grad.tolist(), h)
    assert_same([p.detach()], [torch.tensor(ref_p, dtype=torch.float64)])


def test_adan_first_step_differs_from_the_package():
    """The package's first step moves nothing (its moments are still 0); the authors' Adan
    takes a step of about lr per element (the bias-corrected g / |g|)."""
    p = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    g = torch.tensor([0.5, -0.25, 2.0], dtype=torch.float64)
    p.grad, q.grad = g.clone(), g.clone()
    modern.Adan([p], lr=0.1).step()
    modern.Adan([q], lr=0.1, first_step_moments=False).step()
    assert torch.equal(q.detach(), torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(p.detach(), torch.tensor([0.9, -1.9, 2.9], dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)


def test_cautious_is_a_block_of_any_chain():
    """`cautious` between any block handing on `update` and `update_step`: Cautious Adam built by
    hand is `Adam(cautious=True)`."""
    from functools import partial

    from optcraft.blocks.elementwise import adam_update, cautious, update_step
    hypers = [dict(), dict(lr=3e-2)]

    def by_hand(gs):
        return oc.Optimizer(gs, [oc.weight_decay, partial(oc.average_grad, dampening=True),
                                 oc.average_sqr_grad, oc.step_stat, adam_update, cautious,
                                 update_step], lr=1e-2, mom=0.9, sqr_mom=0.99, eps=1e-8, wd=0.1)
    assert_same(train(by_hand, hypers),
                run_per_element(lambda *a: ref_adamw(*a, cautious=True),
                                [ADAM_H, {**ADAM_H, "lr": 3e-2}]))


# ---- the compiled path -------------------------------------------------------------------------

COMPILED = {"Lion": "package", "ADOPT-decoupled": "package", "Adan-package": "package",
            "Adan": "formula", "MARS-cautious": "formula", "Adam-cautious": "formula"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COMPILED))
def test_compiled_path_matches_the_reference(name, monkeypatch):
    monkeypatch.setattr(compiler_hints, "PER_TENSOR_MIN_NUMEL", 10)
    opts = []
    if COMPILED[name] == "package":
        ours, theirs, hypers = PACKAGE_CASES[name]
        assert_same(train(lambda gs: ours(gs, "compiled"), hypers, n_steps=8, opts=opts),
                    train(theirs, hypers, n_steps=8), rtol=1e-6, atol=1e-10)
    else:
        ours, ref_step, hypers = FORMULA_CASES[name]
        assert_same(train(lambda gs: ours(gs, "compiled"), [h for h, _ in hypers], n_steps=8,
                          opts=opts),
                    run_per_element(ref_step, [r for _, r in hypers], n_steps=8),
                    rtol=1e-6, atol=1e-10)
    assert_compiled(opts[0])


def test_docs_page_examples_run_standalone():
    """Every Python block of docs/modern-elementwise.md runs on its own."""
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parents[1] / "docs" / "modern-elementwise.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert len(blocks) >= 2
    for code in blocks:
        namespace: dict = {}
        exec(compile(code, str(page), "exec"), namespace)
        assert isinstance(namespace["opt"], torch.optim.Optimizer)
