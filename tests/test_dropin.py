"""optcraft where PyTorch users expect torch.optim: torch's defaults and spellings, state dicts
refused before anything changes, no half-applied step, misspelled hyperparameters (issue 20)."""
from __future__ import annotations

import inspect

import pytest
import torch

import optcraft as oc
from optcraft import registry


def _params():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g).requires_grad_() for s in [(4, 3), (3,)]]


# ---- item 3: torch's defaults and spellings ----------------------------------------------------

@pytest.mark.parametrize("ours,torchs", [(oc.SGD, torch.optim.SGD), (oc.Adam, torch.optim.Adam),
                                         (oc.AdamW, torch.optim.AdamW),
                                         (oc.RMSprop, torch.optim.RMSprop),
                                         (oc.RAdam, torch.optim.RAdam)])
def test_built_without_lr_at_torchs_default(ours, torchs):
    opt = ours(_params())
    assert opt.param_groups[0]["lr"] == torchs(_params()).defaults["lr"]


@pytest.mark.parametrize("name", registry.names())
def test_every_named_optimizer_builds_without_lr(name):
    factory = registry.get(name).factory
    params = _params()[:1]  # (a matrix: Muon takes matrices only)
    opt = factory(params=params)  # `params` by keyword, as torch's take it
    default = inspect.signature(factory).parameters["lr"].default
    assert isinstance(default, float) and default > 0
    assert getattr(opt, "opt", opt).param_groups[0]["lr"] == default
    assert list(inspect.signature(factory).parameters)[0] == "params"
    torchs = getattr(torch.optim, {"RMSProp": "RMSprop"}.get(name, name), None)
    if torchs is not None:  # torch has the algorithm: torch's default
        assert default == torchs(_params()[:1]).defaults["lr"]


def test_torch_spellings_are_the_same_optimizers():
    assert oc.AdamW is oc.Adam and oc.RMSprop is oc.RMSProp
    # AdamW's weight decay is decoupled, as torch's: p <- p * (1 - lr * wd) before Adam's step
    p = torch.ones(3, requires_grad=True)
    opt = oc.AdamW([p], lr=0.1, weight_decay=0.5)
    p.grad = torch.zeros(3)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), 0.95))


# ---- item 4: loading a state dict ----------------------------------------------------------

def _stepped(factory, **kwargs):
    params = _params()
    opt = factory(params, **kwargs)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return params, opt


def _snapshot(opt):
    return repr(opt.state_dict())


def _refused_unchanged(opt, sd, match):
    """`opt.load_state_dict(sd)` raises ValueError matching `match` and changes nothing."""
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert _snapshot(opt) == before


def test_state_of_another_dtype_is_cast_to_the_parameters_as_torch_does():
    params, opt = _stepped(oc.Adam)
    sd = opt.state_dict()
    for st in sd["state"].values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                st[k] = v.to(torch.float64)
    ref = torch.optim.Adam(_params())
    for p in ref.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    ref.step()
    ref_sd = ref.state_dict()
    for st in ref_sd["state"].values():
        st["exp_avg"] = st["exp_avg"].to(torch.float64)
    ref.load_state_dict(ref_sd)
    fresh_params, fresh = _stepped(oc.Adam)
    fresh.load_state_dict(sd)
    for p in fresh_params:
        assert fresh.state[p]["grad_avg"].dtype == p.dtype == torch.float32
    assert all(st["exp_avg"].dtype == torch.float32 for st in ref.state.values())


@pytest.mark.parametrize("source,target", [
    (oc.Adam, oc.Lamb), (oc.Adam, lambda ps: oc.SGD(ps, momentum=0.9)), (oc.ranger, oc.RAdam)],
    ids=["Adam-into-Lamb", "Adam-into-SGD", "ranger-into-RAdam"])
def test_a_state_dict_of_another_optimizer_is_refused_before_anything_changes(source, target):
    _, src = _stepped(source)
    _, opt = _stepped(target)
    _refused_unchanged(opt, src.state_dict(), "another optimizer")


@pytest.mark.parametrize("step", ["3", None, [3]])
def test_a_non_number_step_is_refused(step):
    _, opt = _stepped(oc.Adam)
    sd = opt.state_dict()
    sd["state"][0]["step"] = step
    _refused_unchanged(opt, sd, "'step' of parameter 0 must be a number")


def test_a_group_missing_a_hyperparameter_is_refused():
    _, opt = _stepped(oc.Adam)
    sd = opt.state_dict()
    del sd["param_groups"][0]["eps"]
    _refused_unchanged(opt, sd, "has no 'eps'")


def test_ranger_loads_its_own_state_dict():
    _, opt = _stepped(oc.ranger)
    _, other = _stepped(oc.ranger)
    other.load_state_dict(opt.state_dict())


# ---- item 5: nothing half-applied; misspelled hyperparameters ---------------------------------

def test_a_step_failing_on_one_groups_schedule_changes_no_group():
    """Group 0's schedule is fine, group 1's gives a negative lr at step 2: the step that fails
    leaves group 0's lr (and every parameter) as the uninterrupted run left it a step before."""
    a, b = _params()
    opt = oc.SGD([[a], [b]], lr=1e-2)
    opt.set_hyper("lr", [lambda step: 0.1 / (step + 1), lambda step: 0.1 - 0.06 * step])
    for p in (a, b):
        p.grad = torch.ones_like(p)
    opt.step()
    opt.step()
    before = ([g["lr"] for g in opt.param_groups], a.detach().clone(), b.detach().clone())
    with pytest.raises(ValueError, match=r"lr \(parameter group 1\)"):
        opt.step()
    assert [g["lr"] for g in opt.param_groups] == before[0]
    assert torch.equal(a, before[1]) and torch.equal(b, before[2])


def test_a_misspelled_hyperparameter_is_refused_with_the_nearest_name():
    with pytest.raises(ValueError, match="did you mean .sqr_mom."):
        oc.Optimizer(_params(), oc.Adam(_params()).cbs, lr=1e-3, mom_sqr=0.9)
    # the blocks' names, lr and the per-parameter flags are known
    oc.Optimizer(_params(), oc.Adam(_params()).cbs, lr=1e-3, sqr_mom=0.9, eps=1e-6, do_wd=False)


# ---- item 7: a tensor lr as torch takes it ----------------------------------------------------

@pytest.mark.parametrize("impl", ["reference", "foreach", "auto", "compiled"])
def test_a_one_element_tensor_lr_of_any_shape_is_taken_as_torch_takes_it(impl):
    """`torch.tensor(1e-3).reshape(1, 1)` is one number: the steps equal torch.optim.SGD's with
    the same tensor lr."""
    params, ref = _params(), _params()
    opt = oc.SGD(params, lr=torch.tensor(1e-2).reshape(1, 1), momentum=0.9, impl=impl)
    torch_opt = torch.optim.SGD(ref, lr=torch.tensor(1e-2).reshape(1, 1), momentum=0.9)
    g = torch.Generator().manual_seed(2)
    for _ in range(4):
        for p, q in zip(params, ref):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        torch_opt.step()
    torch.testing.assert_close(params, ref)


def test_a_tensor_of_several_numbers_is_refused_as_torch_refuses_it():
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        torch.optim.SGD(_params(), lr=torch.tensor([1e-3, 1e-3]))
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        oc.SGD(_params(), lr=torch.tensor([1e-3, 1e-3]))
    opt = oc.SGD(_params(), lr=1e-3)
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        opt.set_hyper("lr", torch.ones(2, 2))
