"""Issue 8: bad input refused clearly and before anything changes; non-finite numbers without a
guard; checkpoints exact across processes and refused when they do not fit; long runs."""
import copy
import io
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import optcraft as oc


def snapshot(opt, params):
    return (copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params],
            [p.grad.clone() if p.grad is not None else None for p in params])


def assert_unchanged(opt, params, snap):
    sd, values, grads = snap
    now = opt.state_dict()
    assert now["param_groups"] == sd["param_groups"]
    assert now["state"].keys() == sd["state"].keys()
    for k in sd["state"]:
        for name, v in sd["state"][k].items():
            w = now["state"][k][name]
            assert torch.equal(w, v) if isinstance(v, torch.Tensor) else w == v
    for p, v in zip(params, values):
        assert torch.equal(p.detach(), v)
    for p, g in zip(params, grads):
        assert (p.grad is None and g is None) or torch.equal(dense(p.grad), dense(g))


def dense(t):
    return t.to_dense() if t.is_sparse else t


def leaf(*shape):
    return torch.randn(*shape).requires_grad_()


# ---- bad input --------------------------------------------------------------------------------

def test_empty_parameter_list():
    with pytest.raises(ValueError, match="empty parameter list"):
        oc.Adam([], lr=1e-3)
    with pytest.raises(ValueError, match="group 1 is empty"):
        oc.Adam([[leaf(2)], []], lr=1e-3)


def test_parameter_in_two_groups():
    p = leaf(2)
    with pytest.raises(ValueError, match="more than one parameter group"):
        oc.Adam([[p], [p]], lr=1e-3)


def test_parameter_twice_in_one_group():
    p = leaf(2)
    with pytest.raises(ValueError, match="more than once"):
        oc.Adam([p, p], lr=1e-3)


def test_non_leaf_tensor():
    p = leaf(2)
    with pytest.raises(ValueError, match="non-leaf"):
        oc.SGD([p * 2], lr=0.1)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="Tensors"):
        oc.SGD([1, 2, 3], lr=0.1)


def test_sparse_gradient_refused_before_anything_changes():
    a, b = leaf(3), leaf(4)
    opt = oc.Adam([[a], [b]], lr=0.1)
    a.grad = torch.ones(3)
    b.grad = torch.eye(4)[0].to_sparse()
    snap = snapshot(opt, [a, b])
    with pytest.raises(RuntimeError, match="parameter group 1.*sparse"):
        opt.step()
    assert_unchanged(opt, [a, b], snap)


@pytest.mark.parametrize("value, error, text", [
    ("0.1", TypeError, r"lr \(parameter group 0\) must be a real number, got str"),
    (None, TypeError, r"lr \(parameter group 0\) must be a real number, got NoneType"),
    (True, TypeError, r"lr \(parameter group 0\) must be a real number, got bool"),
    (-0.1, ValueError, r"lr \(parameter group 0\) must be in \[0, inf\), got -0.1"),
    (torch.ones(2), ValueError, "Tensor lr must be 1-element"),
    (torch.tensor(1 + 1j), TypeError, "real"),
])
def test_wrong_type_or_range(value, error, text):
    with pytest.raises(error, match=text):
        oc.SGD([leaf(2)], lr=value)


def test_list_of_the_wrong_length_changes_nothing():
    params = [leaf(2), leaf(2)]
    opt = oc.SGD([[params[0]], [params[1]]], lr=0.1)
    snap = snapshot(opt, params)
    with pytest.raises(ValueError, match="3 values for 2 parameter group"):
        opt.set_hyper("lr", [0.1, 0.2, 0.3])
    assert_unchanged(opt, params, snap)


def test_unknown_hyperparameter_in_set_hyper():
    opt = oc.Adam([leaf(2)], lr=0.1)
    with pytest.raises(ValueError, match="unknown hyperparameter 'sqr_mon'; did you mean 'sqr_mom'"):
        opt.set_hyper("sqr_mon", 0.9)
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        opt.set_hypers(lr=0.2, moment=0.9)
    assert opt.hypers[0]["lr"] == 0.1


def test_bad_group_dict():
    with pytest.raises(ValueError, match="parameter group 0: both 'betas'"):
        oc.Adam([{"params": [leaf(2)], "betas": (0.9, 0.9), "mom": 0.8}], lr=0.1)
    with pytest.raises(ValueError, match=r"mom \(parameter group 1\)"):
        oc.Adam([{"params": [leaf(2)]}, {"params": [leaf(2)], "mom": 3}], lr=0.1)


def test_bad_callbacks():
    with pytest.raises(TypeError, match="callable"):
        oc.Optimizer([leaf(2)], [oc.sgd_step, "adam"], lr=0.1)


# ---- non-finite numbers without a guard --------------------------------------------------------

def test_without_a_guard_nan_flows_like_torch_optim():
    """Documented behaviour: like torch.optim, the chain does arithmetic on what it is given. A NaN
    gradient makes the parameter and the running averages NaN (use `optcraft.transforms`'s
    skip-non-finite guard, or GradScaler, to stop it)."""
    a = torch.ones(3, requires_grad=True)
    b = torch.ones(3, requires_grad=True)
    ours, theirs = oc.Adam([a], lr=0.1, wd=0.0), torch.optim.Adam([b], lr=0.1)
    for p in (a, b):
        p.grad = torch.tensor([1.0, float("nan"), 1.0])
    ours.step()
    theirs.step()
    assert torch.equal(torch.isnan(a.detach()), torch.isnan(b.detach()))
    assert torch.isnan(ours.state[a]["grad_avg"][1]) and torch.isnan(ours.state[a]["sqr_avg"][1])
    assert not torch.isnan(ours.state[a]["grad_avg"][0])


# ---- checkpoints -------------------------------------------------------------------------------

def test_truncated_state_is_refused_and_changes_nothing():
    params = [leaf(3), leaf(2, 2)]
    opt = oc.Adam(params, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    sd = opt.state_dict()
    del sd["state"][1]["sqr_avg"]
    snap = snapshot(opt, params)
    with pytest.raises(ValueError, match="truncated: it has grad_avg, step but not sqr_avg"):
        opt.load_state_dict(sd)
    assert_unchanged(opt, params, snap)


def test_truncated_file_is_refused_and_changes_nothing():
    params = [leaf(3)]
    opt = oc.Adam(params, lr=0.1)
    params[0].grad = torch.ones(3)
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    data = buf.getvalue()[: len(buf.getvalue()) // 2]
    snap = snapshot(opt, params)
    with pytest.raises(Exception):
        opt.load_state_dict(torch.load(io.BytesIO(data), weights_only=True))
    assert_unchanged(opt, params, snap)


def test_state_for_unknown_parameter_id_is_refused():
    params = [leaf(3)]
    opt = oc.Adam(params, lr=0.1)
    sd = opt.state_dict()
    sd["state"][5] = {"step": 1}
    with pytest.raises(ValueError, match="parameter id 5"):
        opt.load_state_dict(sd)


FRESH_PROCESS = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from _checkpoint_cases import CASES, build, train
    folder, k, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    for name in sys.argv[4:]:
        path = f"{{folder}}/{{name}}.pt"
        ckpt = torch.load(path, weights_only=True)
        model, opt, data = build(name, seed=123)   # other weights: all come from the checkpoint
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        train(model, opt, data[k:n])
        torch.save([p.detach() for p in model.parameters()], path + ".out")
""")


def test_checkpoint_cases_cover_every_named_optimizer():
    sys.path.insert(0, os.path.dirname(__file__))
    from _checkpoint_cases import CASES
    for name in ("SGD", "RMSProp", "Adam", "RAdam", "QHAdam", "Larc", "Lamb", "ranger",
                 "Lookahead(Adam)", "OptimWrapper(torch AdamW)"):
        assert name in CASES


def test_checkpoint_resumes_bit_exact_in_a_fresh_process(tmp_path):
    sys.path.insert(0, os.path.dirname(__file__))
    from _checkpoint_cases import CASES, build, train
    k, n = 7, 16
    script = tmp_path / "resume.py"
    script.write_text(FRESH_PROCESS.format(tests=os.path.dirname(__file__)))
    names = sorted(CASES)
    expected = {}
    for name in names:
        model, opt, data = build(name)
        train(model, opt, data[:n])
        expected[name] = [p.detach().clone() for p in model.parameters()]
        model, opt, data = build(name)
        train(model, opt, data[:k])
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / f"{name}.pt")
    # One fresh interpreter resumes every case (each from its own file, with its own objects):
    # nothing of the saving process is there.
    result = subprocess.run([sys.executable, str(script), str(tmp_path), str(k), str(n), *names],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    for name in names:
        got = torch.load(tmp_path / f"{name}.pt.out", weights_only=True)
        for a, b in zip(got, expected[name]):
            assert torch.equal(a, b), name


# ---- long runs ---------------------------------------------------------------------------------

def state_size(opt):
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


LONG_RUN = {
    "SGD": lambda ps: oc.SGD(ps, lr=0.01, mom=0.9, wd=1e-4),
    "RMSProp": lambda ps: oc.RMSProp(ps, lr=1e-3, mom=0.9),
    "Adam": lambda ps: oc.Adam(ps, lr=1e-3),
    "RAdam": lambda ps: oc.RAdam(ps, lr=1e-3),
    "QHAdam": lambda ps: oc.QHAdam(ps, lr=1e-3),
    "Larc": lambda ps: oc.Larc(ps, lr=0.1),
    "Lamb": lambda ps: oc.Lamb(ps, lr=1e-3, wd=0.01),
    "ranger": lambda ps: oc.ranger(ps, lr=1e-3),
    # the research recipes (docs/research.md), with weight decay where they take it
    **{name: (lambda ps, name=name: getattr(oc, name)(ps, lr=1e-3)) for name in
       ("SAdam", "SRAdam", "AdamGC", "StableAdam", "AdamAWD", "UM", "DuvAdam", "SUAdam",
        "BAdam")},
    "LAMB": lambda ps: oc.LAMB(ps, lr=1e-3, wd=0.01),
    "PreLAMB": lambda ps: oc.PreLAMB(ps, lr=1e-3, wd=0.01),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LONG_RUN))
def test_ten_thousand_steps(name):
    torch.manual_seed(0)
    target = torch.randn(8, 4)
    # not zeros: LARS/LARC's trust ratio is 0 for a zero tensor, so it would never move
    w, b = (0.1 * torch.randn(8, 4)).requires_grad_(), (0.1 * torch.randn(4)).requires_grad_()
    opt = LONG_RUN[name]([w, b])
    x = torch.randn(32, 8)
    y = x @ target
    size_after_first = None
    first_loss = None
    for i in range(10_000):
        loss = ((x @ w + b - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i == 0:
            size_after_first, first_loss = state_size(opt), loss.item()
    assert torch.isfinite(w).all() and torch.isfinite(b).all()
    assert all(torch.isfinite(v).all() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))
    assert state_size(opt) == size_after_first
    assert loss.item() < first_loss
    assert math.isfinite(loss.item())


def test_an_empty_group_dict_is_kept_as_torch_keeps_it():
    """A group dict with no parameters (ZeroRedundancyOptimizer hands one to a rank that holds no
    parameter of a group; `add_param_group({"params": []})`) is taken as torch.optim takes it:
    the other groups step as torch's AdamW steps them, and the checkpoint round-trips."""
    torch.manual_seed(0)
    p = leaf(4, 3)
    q = p.detach().clone().requires_grad_()
    ours = oc.Adam([{"params": []}, {"params": [p], "lr": 0.1}], lr=0.01, sqr_mom=0.999,
                   eps=1e-8)
    theirs = torch.optim.AdamW([{"params": []}, {"params": [q], "lr": 0.1}], lr=0.01)
    ours.add_param_group({"params": []})
    theirs.add_param_group({"params": []})
    for _ in range(3):
        g = torch.randn(4, 3)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(p, q)
    saved = ours.state_dict()
    assert [g["params"] for g in saved["param_groups"]] == \
        [g["params"] for g in theirs.state_dict()["param_groups"]]
    ours.load_state_dict(saved)
    assert [len(g["params"]) for g in ours.param_groups] == [0, 1, 0]
