"""Learning-rate-free optimizers (issue 18) against their reference packages, and the core
capabilities they use (issue 17): group state, values summed over every parameter, the
evaluation point.

Each optimizer runs next to its package (`schedulefree`, `prodigyopt`) in float64 for 30 steps,
two parameter groups with different hyperparameters, a gradient that depends on the parameters
(so that Prodigy's `d` grows) and gradients missing at some steps; parameters are compared after
every step, and schedule-free ones at `x` (`eval()`) too."""
from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import torch

from optcraft import compiler_hints
from optcraft.engine import compiled
from optcraft.blocks import l2_reg, sgd_step
from optcraft.blocks.base import block, group, summed
from optcraft.optimizer import Optimizer
from optcraft.optimizers.classic import SGD
from optcraft.optimizers.lr_free import (AdamWScheduleFree, Prodigy, SGDScheduleFree,
                                         schedule_free)

schedulefree = pytest.importorskip("schedulefree")
prodigyopt = pytest.importorskip("prodigyopt")

SHAPES = [(6, 5), (5,), (3, 4, 2), (7,), ()]
STEPS = 30
RTOL, ATOL = 1e-10, 1e-12


def make_params(dtype=torch.float64, shapes=SHAPES):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def groups_of(params, second):
    return [{"params": params[:3]}, {"params": params[3:], **second}]


# name -> (reference package's optimizer, optcraft's, second group's hyperparameters for each,
#          whether it has an evaluation point)
CASES = {
    "AdamWScheduleFree": (
        lambda g: schedulefree.AdamWScheduleFree(g, lr=0.05, warmup_steps=5, r=0.5,
                                                 weight_decay=0.01),
        lambda g, impl: AdamWScheduleFree(g, lr=0.05, warmup_steps=5, r=0.5, weight_decay=0.01,
                                          impl=impl),
        dict(lr=0.02, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6, weight_lr_power=1.0),
        None, True),
    "AdamWScheduleFree-defaults": (
        lambda g: schedulefree.AdamWScheduleFree(g),
        lambda g, impl: AdamWScheduleFree(g, impl=impl),
        dict(lr=0.01), None, True),
    "SGDScheduleFree": (
        lambda g: schedulefree.SGDScheduleFree(g, lr=0.1, momentum=0.8, warmup_steps=5,
                                               weight_decay=0.01),
        lambda g, impl: SGDScheduleFree(g, lr=0.1, momentum=0.8, warmup_steps=5,
                                        weight_decay=0.01, impl=impl),
        dict(lr=0.05, momentum=0.9, weight_decay=0.1, r=1.0), None, True),
    "schedule_free(SGD)": (
        lambda g: schedulefree.SGDScheduleFree(g, lr=0.1, momentum=0.8, warmup_steps=5),
        lambda g, impl: _schedule_free_sgd(g, impl),
        dict(lr=0.05, momentum=0.9, r=1.0), dict(lr=0.05, sf_mom=0.9, r=1.0), True),
    "schedule_free(sgd_step, at_y=l2_reg)": (
        lambda g: schedulefree.SGDScheduleFree(g, lr=0.1, momentum=0.8, weight_decay=0.01),
        lambda g, impl: schedule_free([sgd_step], g, lr=0.1, wd=0.01, sf_mom=0.8, at_y=[l2_reg],
                                      impl=impl),
        dict(lr=0.05, momentum=0.9, weight_decay=0.1), dict(lr=0.05, sf_mom=0.9, wd=0.1), True),
    "Prodigy": (
        lambda g: prodigyopt.Prodigy(g, lr=1.0),
        lambda g, impl: Prodigy(g, lr=1.0, impl=impl),
        dict(weight_decay=0.1, eps=1e-6), None, False),
    "Prodigy-bias-correction": (
        lambda g: prodigyopt.Prodigy(g, lr=0.5, weight_decay=0.01, use_bias_correction=True,
                                     d_coef=2.0, d0=1e-4),
        lambda g, impl: Prodigy(g, lr=0.5, weight_decay=0.01, use_bias_correction=True,
                                d_coef=2.0, d0=1e-4, impl=impl),
        dict(weight_decay=0.1, eps=1e-6), None, False),
    "Prodigy-l2-no-first-moment": (
        lambda g: prodigyopt.Prodigy(g, betas=(0.0, 0.99), weight_decay=0.01, decouple=False,
                                     safeguard_warmup=True, growth_rate=2.0, beta3=0.9,
                                     d0=1e-3),
        lambda g, impl: Prodigy(g, betas=(0.0, 0.99), weight_decay=0.01, decouple=False,
                                safeguard_warmup=True, growth_rate=2.0, beta3=0.9, d0=1e-3,
                                impl=impl),
        dict(weight_decay=0.1, eps=1e-6), None, False),
    "Prodigy-slice_p": (
        lambda g: prodigyopt.Prodigy(g, slice_p=3),
        lambda g, impl: Prodigy(g, slice_p=3, impl=impl),
        dict(weight_decay=0.1), None, False),
}


def _schedule_free_sgd(groups, impl):
    """schedule_free around SGD(lr=0.1), the second group's schedule-free hyperparameters set on
    the wrapped optimizer (SGD's groups know nothing of them)."""
    own = [{k: v for k, v in g.items() if k in ("params", "lr")} for g in groups]
    opt = schedule_free(SGD(own, lr=0.1, impl=impl), sf_mom=0.8, warmup_steps=5)
    for k in ("sf_mom", "r"):
        opt.set_hyper(k, [g.get(k, opt.hypers[0][k]) for g in groups])
    return opt


def set_grads(params, step, g):
    """A gradient pulling every parameter towards 3 (plus noise), missing at some steps."""
    for j, p in enumerate(params):
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
        p.grad = None if (step + j) % 4 == 0 else \
            ((p.detach() - 3) + 0.1 * noise.to(p.dtype))


def assert_params_close(ours, theirs, rtol=RTOL, atol=ATOL):
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("impl", ["reference", "foreach"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_the_reference_package(name, impl):
    make_ref, make_ours, second, our_second, has_eval = CASES[name]
    theirs, ours = make_params(), make_params()
    ref = make_ref(groups_of(theirs, second))
    opt = make_ours(groups_of(ours, our_second or second), impl)
    if has_eval:
        ref.train()  # schedulefree's optimizers start in eval mode, optcraft's in train mode
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    start = [p.detach().clone() for p in ours]
    for i in range(STEPS):
        set_grads(theirs, i, g1)
        set_grads(ours, i, g2)
        ref.step()
        opt.step()
        assert_params_close(ours, theirs)
        if has_eval and i % 7 == 3:
            ref.eval()
            opt.eval()
            assert_params_close(ours, theirs)
            ref.train()
            opt.train()
            assert_params_close(ours, theirs)
    assert max((p - q).abs().max() for p, q in zip(ours, start)) > 0.1  # it moved
    if name.startswith("Prodigy"):
        for ref_group, our_group in zip(ref.param_groups, opt.param_groups):
            kept = our_group["group_state"]
            assert isinstance(kept["d"], torch.Tensor) and kept["d"].dim() == 0
            assert kept["d"].item() == pytest.approx(ref_group["d"], rel=1e-10)
            assert kept["d_max"].item() == pytest.approx(ref_group["d_max"], rel=1e-10)
            assert kept["k"] == ref_group["k"]
        assert opt.param_groups[0]["group_state"]["d"] > 10 * opt.param_groups[0]["d0"]
    else:
        for ref_group, our_group in zip(ref.param_groups, opt.param_groups):
            kept = our_group["group_state"]
            assert kept["k"] == ref_group["k"]
            assert kept["weight_sum"] == pytest.approx(ref_group["weight_sum"], rel=1e-12)
            assert kept["lr_max"] == ref_group["lr_max"]


# ---- checkpoints ---------------------------------------------------------------------------------

def _run(steps, params, opt, g, start=0):
    for i in range(start, steps):
        set_grads(params, i, g)
        opt.step()


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("impl", ["reference", "foreach"])
@pytest.mark.parametrize("name", ["AdamWScheduleFree", "SGDScheduleFree", "schedule_free(SGD)",
                                  "Prodigy", "Prodigy-l2-no-first-moment"])
def test_checkpoint_resumes_exactly(name, impl, mode):
    """A checkpoint taken mid-run (in train mode, or in eval mode: parameters at `x`) resumes,
    through torch.save and torch.load(weights_only=True) into a fresh optimizer, exactly as the
    run that was not interrupted."""
    _, make_ours, second, our_second, has_eval = CASES[name]
    if mode == "eval" and not has_eval:
        pytest.skip("no evaluation point")
    cut = 13

    def pause(opt):
        if mode == "eval":
            opt.eval()

    def resume(opt):
        if mode == "eval":
            opt.train()

    params = make_params()
    opt = make_ours(groups_of(params, our_second or second), impl)
    g = torch.Generator().manual_seed(1)
    _run(cut, params, opt, g)
    pause(opt)
    at_pause = [p.detach().clone() for p in params]
    resume(opt)
    _run(STEPS, params, opt, g, start=cut)
    uninterrupted = [p.detach().clone() for p in params]

    params = make_params()
    opt = make_ours(groups_of(params, our_second or second), impl)
    g = torch.Generator().manual_seed(1)
    _run(cut, params, opt, g)
    pause(opt)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    checkpoint = torch.load(buf, weights_only=True)
    del opt, params

    fresh = [p.detach().add(1.0).requires_grad_() for p in make_params()]  # overwritten below
    with torch.no_grad():
        for p, saved in zip(fresh, checkpoint["params"]):
            p.copy_(saved)
    assert all(torch.equal(p, q) for p, q in zip(fresh, at_pause))
    opt = make_ours(groups_of(fresh, our_second or second), impl)
    opt.load_state_dict(checkpoint["opt"])
    if mode == "eval":
        with pytest.raises(RuntimeError, match="eval mode"):
            opt.step()
    resume(opt)
    _run(STEPS, fresh, opt, g, start=cut)
    for p, q in zip(fresh, uninterrupted):
        assert torch.equal(p.detach(), q)


def test_checkpoint_taken_in_eval_mode_still_matches_the_package():
    """schedulefree's own advice (save in eval mode) with optcraft: the resumed run follows the
    package's uninterrupted run."""
    make_ref, make_ours, second, _, _ = CASES["AdamWScheduleFree"]
    theirs = make_params()
    ref = make_ref(groups_of(theirs, second))
    ref.train()
    g = torch.Generator().manual_seed(1)
    for i in range(STEPS):
        set_grads(theirs, i, g)
        ref.step()
    ref.eval()

    ours = make_params()
    opt = make_ours(groups_of(ours, second), "foreach")
    g = torch.Generator().manual_seed(1)
    _run(10, ours, opt, g)
    opt.eval()
    sd = opt.state_dict()
    assert [grp["group_state"]["train_mode"] for grp in sd["param_groups"]] == [False, False]
    opt2 = make_ours(groups_of(ours, second), "foreach")
    opt2.load_state_dict(sd)
    opt2.train()
    _run(STEPS, ours, opt2, g, start=10)
    opt2.eval()
    assert_params_close(ours, theirs)


def step_together(ref, opt, theirs, ours, steps: int, **close) -> None:
    """`steps` steps of the package's optimizer and ours on the same gradients; with `close`
    (tolerances), the parameters compared after every step."""
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for i in range(steps):
        set_grads(theirs, i, g1)
        set_grads(ours, i, g2)
        ref.step()
        opt.step()
        if close:
            assert_params_close(ours, theirs, **close)


# ---- the compiled path ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["AdamWScheduleFree", "schedule_free(SGD)", "Prodigy"])
def test_compiled_path_matches_the_reference_package(name, monkeypatch):
    monkeypatch.setattr(compiler_hints, "PER_TENSOR_MIN_NUMEL", 10)
    read_back = []
    monkeypatch.setattr(compiled, "_read_back", lambda t, like: read_back.append(t) or t.item())
    make_ref, make_ours, second, our_second, has_eval = CASES[name]
    theirs, ours = make_params(), make_params()
    ref = make_ref(groups_of(theirs, second))
    opt = make_ours(groups_of(ours, our_second or second), "compiled")
    if has_eval:
        ref.train()
    step_together(ref, opt, theirs, ours, 20, rtol=1e-9, atol=1e-11)
    assert opt.path.compiles > 0
    assert read_back == []  # the group's numbers are not read back from the graphs
    if has_eval:
        ref.eval()
        opt.eval()
        assert_params_close(ours, theirs, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("impl", ["reference", "foreach"])
@pytest.mark.parametrize("name", ["AdamWScheduleFree", "SGDScheduleFree", "Prodigy",
                                  "Prodigy-l2-no-first-moment"])
def test_do_wd_false_is_the_package_without_weight_decay_for_that_parameter(name, impl):
    """optcraft's per-parameter mask (`do_wd=False` in a parameter's state, as optax's masks set
    it): the package with that parameter in a group of its own without weight decay."""
    make_ref, make_ours, _, _, has_eval = CASES[name]
    theirs, ours = make_params(), make_params()
    ref = make_ref([{"params": theirs[:1] + theirs[2:], "weight_decay": 0.1},
                    {"params": theirs[1:2], "weight_decay": 0.0}])
    opt = make_ours([{"params": ours, "weight_decay": 0.1}], impl)
    opt.state[ours[1]]["do_wd"] = False
    if has_eval:
        ref.train()
    step_together(ref, opt, theirs, ours, 20)
    if has_eval:
        ref.eval()
        opt.eval()
    assert_params_close(ours, theirs)


# ---- schedule-free: modes and the wrapper --------------------------------------------------------

def test_step_in_eval_mode_raises_and_modes_are_idempotent():
    params = make_params()
    opt = SGDScheduleFree(params, lr=0.1)
    set_grads(params, 1, torch.Generator().manual_seed(0))
    opt.step()
    opt.eval()
    at_x = [p.detach().clone() for p in params]
    opt.eval()  # already there: nothing moves
    assert all(torch.equal(p, q) for p, q in zip(params, at_x))
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step()
    opt.train()
    opt.train()
    opt.step()
    assert "train_mode" not in opt.hypers[0] and "group_state" not in opt.hypers[0]


def test_schedule_free_around_a_list_of_blocks_equals_around_an_optimizer():
    a, b = make_params(), make_params()
    opt_a = schedule_free(SGD(a, lr=0.1), sf_mom=0.8)
    opt_b = schedule_free(SGD(b, lr=0.1).cbs, b, lr=0.1, mom=0.0, wd=0.0, sf_mom=0.8)
    ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for i in range(10):
        set_grads(a, i, ga)
        set_grads(b, i, gb)
        opt_a.step()
        opt_b.step()
    opt_a.eval()
    opt_b.eval()
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_torch_names_and_defaults():
    params = make_params()
    opt = AdamWScheduleFree(params, betas=(0.8, 0.99), weight_decay=0.1)
    assert opt.param_groups[0]["betas"] == (0.8, 0.99) and opt.param_groups[0]["wd"] == 0.1
    assert opt.param_groups[0]["lr"] == 0.0025 and opt.param_groups[0]["warmup_steps"] == 0
    opt = Prodigy(params)
    assert opt.param_groups[0]["d0"] == 1e-6 and opt.param_groups[0]["growth_rate"] == float("inf")
    with pytest.raises(ValueError, match="slice_p"):
        Prodigy([{"params": params, "slice_p": 2}])


@pytest.mark.parametrize("name", ["Prodigy", "AdamWScheduleFree", "schedule_free(SGD)"])
def test_a_step_reads_no_tensor_value_on_the_host(name, monkeypatch):
    """No `.item()`, `float(t)` or `if t:` in a step (on a GPU each is a wait for the device):
    Prodigy's sums and `d` stay tensors."""
    _, make_ours, second, our_second, _ = CASES[name]
    params = make_params()
    opt = make_ours(groups_of(params, our_second or second), "foreach")
    g = torch.Generator().manual_seed(1)
    _run(3, params, opt, g)

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor's value was read on the host")
    with monkeypatch.context() as patch:
        for method in ("item", "__bool__", "__float__", "__int__", "tolist"):
            patch.setattr(torch.Tensor, method, refuse)
        _run(6, params, opt, g, start=3)
    assert all(torch.isfinite(p).all() for p in params)


# ---- the core capabilities, through public behaviour ---------------------------------------------

@block(state=dict(sq=summed), reads="tensor")
def _square_sum(p, **kwargs):
    return dict(sq=p.grad.mul(p.grad).sum())


@block(state=dict(total=group(None), seen=group(0)), reads="all")
def _record_total(p, sq=0.0, seen=0, **kwargs):
    return dict(total=sq, seen=seen + 1)


@pytest.mark.parametrize("impl", ["reference", "foreach"])
def test_a_summed_value_is_the_sum_over_every_parameter_of_every_group(impl):
    params = make_params()
    opt = Optimizer([params[:2], params[2:]], [_square_sum, _record_total], lr=0.1, impl=impl)
    g = torch.Generator().manual_seed(3)
    for i in range(4):
        set_grads(params, i, g)
        opt.step()
        expected = sum(p.grad.double().pow(2).sum() for p in params if p.grad is not None)
        for grp in opt.param_groups:
            total = grp["group_state"]["total"]
            assert isinstance(total, torch.Tensor) and total.dim() == 0
            torch.testing.assert_close(total, expected, rtol=1e-14, atol=0)
            assert grp["group_state"]["seen"] == i + 1


def test_group_state_round_trips_through_state_dict_exactly():
    params = make_params()
    opt = Prodigy([{"params": params[:3]}, {"params": params[3:], "wd": 0.1}])
    g = torch.Generator().manual_seed(1)
    _run(12, params, opt, g)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    fresh = Prodigy([{"params": params[:3]}, {"params": params[3:], "wd": 0.1}])
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    for mine, theirs in zip(fresh.param_groups, opt.param_groups):
        assert mine["group_state"].keys() == theirs["group_state"].keys() == \
            {"d", "d_max", "d_numerator", "k"}
        for k, v in theirs["group_state"].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(mine["group_state"][k], v)
                assert mine["group_state"][k] is not v
            else:
                assert mine["group_state"][k] == v
    assert "d" not in fresh.hypers[0] and "group_state" not in dict(fresh.hypers[0])


# ---- the documentation page ----------------------------------------------------------------------

PAGE = Path(__file__).resolve().parents[1] / "docs" / "modern-lr-free.md"


@pytest.mark.parametrize("index", range(len(re.findall(r"```python\n", PAGE.read_text())))
                         if PAGE.exists() else [])
def test_docs_blocks_run_standalone(index):
    code = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)[index]
    exec(compile(code, f"{PAGE}[{index}]", "exec"), {})
