"""A step never waits for the device: no `.item()`, no Python branch on a tensor's value, on any
eager path, for every named optimizer, with a float lr and with a tensor lr.

Checked on the CPU with a `TorchDispatchMode` that fails on every operation reading a tensor's
value into Python (on a GPU each would make the host wait for the device's queue); the GPU check
(`torch.cuda.set_sync_debug_mode("error")`, CUDA-graph capture) is in tests/test_cuda.py.  What a
CUDA graph records of a step is checked here too (the same operations, numbers and memory step
after step), for the chains without a count and for counted ones with `capturable=True`.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from optcraft import registry

#: aten operations that hand a tensor's value to Python.
READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
         torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default}


class NoValueReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in READS or getattr(func, "overloadpacket", None) in {f.overloadpacket
                                                                       for f in READS}:
            raise AssertionError(f"a step read a tensor's value into Python ({func})")
        return func(*args, **(kwargs or {}))


def _params():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g).requires_grad_() for s in [(6, 5), (5,), (3, 4, 2)]]


def _steps(opt, params, n=4):
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


@pytest.mark.parametrize("impl", ["reference", "foreach", "auto"])
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
@pytest.mark.parametrize("name", registry.names())
def test_a_step_reads_no_tensor_value(name, impl, tensor_lr):
    entry = registry.get(name)
    params, ref_params = _params(), _params()
    lr = torch.tensor(entry.lr) if tensor_lr else entry.lr
    opt = entry.make(params, lr=lr, impl=impl)
    reference = entry.make(ref_params, lr=entry.lr, impl="reference")
    with NoValueReads():
        _steps(opt, params)
    _steps(reference, ref_params)
    # the same numbers as the reference path with a float lr (to rounding for a tensor lr)
    torch.testing.assert_close(params, ref_params, rtol=1e-5, atol=1e-6)


def test_the_check_catches_a_read():
    with pytest.raises(AssertionError, match="read a tensor's value"):
        with NoValueReads():
            torch.ones(()).item()


class OperationLog(TorchDispatchMode):
    """What a CUDA graph records of a step: each operation with its Python arguments, and its
    tensors named by what they are (a parameter, a gradient, a state tensor, the lr: memory a
    replay reads and writes again) or, for a temporary, by shape and dtype (a replay reuses the
    capture's memory for it)."""

    def __init__(self, persistent: dict):
        super().__init__()
        self.persistent, self.ops = persistent, []

    def _name(self, a):
        if isinstance(a, torch.Tensor):
            return self.persistent.get(a.data_ptr(), ("temporary", tuple(a.shape), a.dtype))
        if isinstance(a, (list, tuple)):
            return tuple(self._name(x) for x in a)
        return a

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace != "profiler":  # (torch's record_function around a step)
            self.ops.append((func, self._name(args), self._name(tuple((kwargs or {}).items()))))
        return func(*args, **(kwargs or {}))


def _what_a_capture_records(opt, params, lr, steps=4):
    """The operations of the last two of `steps` steps, as a CUDA graph would record them."""
    g = torch.Generator().manual_seed(1)
    grads = [torch.zeros_like(p) for p in params]  # static gradients, as a capture needs
    for p, gr in zip(params, grads):
        p.grad = gr
    logs = []
    for i in range(steps):
        for gr in grads:
            gr.copy_(torch.randn(gr.shape, generator=g))
        persistent = {lr.data_ptr(): "lr"}
        for j, p in enumerate(params):
            persistent[p.data_ptr()], persistent[p.grad.data_ptr()] = ("param", j), ("grad", j)
            for k, v in opt.state[p].items():
                if isinstance(v, torch.Tensor):
                    persistent[v.data_ptr()] = (k, j)
        with OperationLog(persistent) as log:
            opt.step()
        logs.append(log.ops)
    return logs[-2], logs[-1]


@pytest.mark.parametrize("impl", ["foreach", "auto"])
@pytest.mark.parametrize("name,settings", [("SGD", {"mom": 0.9}), ("RMSProp", {}), ("Larc", {})])
def test_a_capturable_step_repeats_the_same_operations(name, settings, impl):
    """The chains tests/test_cuda.py captures in a CUDA graph: once their state exists, two steps
    run the same operations, with the same Python numbers, on the same parameter, gradient, state
    and lr memory (state updated in place), so a replay of one is the next.  (The CPU's view of
    what the GPU test checks by replaying.)"""
    params = _params()
    lr = torch.tensor(0.01)
    opt = registry.get(name).factory(params, lr=lr, impl=impl, **settings)
    before, after = _what_a_capture_records(opt, params, lr)
    assert before == after


def test_a_step_count_in_python_is_not_capturable():
    """Adam's bias correction is worked out from the step count in Python, so two steps differ in
    their numbers (docs/integration.md: such chains are not captured)."""
    params = _params()
    lr = torch.tensor(0.01)
    before, after = _what_a_capture_records(registry.get("Adam").make(params, lr=lr), params, lr)
    assert [op for op, *_ in before] == [op for op, *_ in after] and before != after


CAPTURABLE = ["Adam", "RAdam", "NAdam", "Lamb", "Adamax", "ASGD", "QHAdam", "ADOPT", "Adan"]


@pytest.mark.parametrize("impl", ["foreach", "auto", "compiled"])
@pytest.mark.parametrize("name", CAPTURABLE)
def test_capturable_counted_chains_repeat_the_same_operations(name, impl):
    """`capturable=True` (torch's name): the step count lives on the device, once per group,
    written in place, so two steps of the Adam family run the same operations with the same
    Python numbers on the same memory (what a CUDA graph replays); and the numbers are those of
    the optimizer with Python counts (checked against torch.optim in the reference tests)."""
    entry = registry.get(name)
    params, ref_params = _params(), _params()
    lr = torch.tensor(entry.lr)
    opt = entry.make(params, lr=lr, impl=impl, capturable=True)
    before, after = _what_a_capture_records(opt, params, lr)
    assert before == after
    reference = entry.make(ref_params, lr=torch.tensor(entry.lr), impl="reference")
    _what_a_capture_records(reference, ref_params, lr=torch.tensor(0.0))
    torch.testing.assert_close(params, ref_params, rtol=1e-5, atol=1e-6)


def test_capturable_adam_is_torchs_adamw():
    """Adam with its count on the device, two groups, against torch.optim.AdamW."""
    params, ref = _params(), _params()
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.05}]  # noqa: E731
    opt = registry.get("Adam").make(groups(params), lr=0.01, betas=(0.9, 0.999), eps=1e-8,
                                    weight_decay=0.01, capturable=True)
    torch_opt = torch.optim.AdamW(groups(ref), lr=0.01, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=0.01)
    _steps(opt, params, n=10)
    _steps(torch_opt, ref, n=10)
    torch.testing.assert_close(params, ref)
    assert [g["group_state"]["step"] for g in opt.param_groups] == [10, 10]


def test_capturable_state_round_trips_through_a_checkpoint(tmp_path):
    """Saved after 3 steps (the count a tensor in the group's state), loaded with
    `weights_only=True` into a new optimizer on copies of the parameters, 3 steps more: the
    uninterrupted run's numbers; a deep copy keeps the setting and the count."""
    import copy

    params, ref = _params(), _params()
    make = lambda ps: registry.get("RAdam").make(ps, lr=0.01, capturable=True)  # noqa: E731
    opt, uninterrupted = make(params), make(ref)
    _steps(opt, params, n=3)
    _steps(uninterrupted, ref, n=3)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = make(resumed_params)
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        step_grads = [torch.randn(p.shape, generator=g) for p in params]
        for ps, o in ((resumed_params, resumed), (ref, uninterrupted)):
            for p, gr in zip(ps, step_grads):
                p.grad = gr.clone()
            o.step()
    torch.testing.assert_close(resumed_params, ref)
    twin = copy.deepcopy(resumed)
    assert twin.capturable and twin.param_groups[0]["group_state"]["step"] == 6


def test_capturable_is_chosen_before_the_first_step():
    params = _params()
    opt = registry.get("Adam").make(params)
    _steps(opt, params, n=1)
    before = {p: dict(s) for p, s in opt.state.items()}
    with pytest.raises(RuntimeError, match="before the optimizer's first step"):
        opt.set_capturable(True)
    assert not opt.capturable and {p: dict(s) for p, s in opt.state.items()}.keys() == \
        before.keys()
    with pytest.raises(ValueError, match="no fused kernel"):
        registry.get("Adam").make(_params(), impl="fused", capturable=True)
    with pytest.raises(TypeError, match="capturable must be True or False"):
        registry.get("Adam").make(_params(), capturable="yes")
