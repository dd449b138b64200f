"""A step never waits for the device: no `.item()`, no Python branch on a tensor's value, on any
eager path, for every named optimizer, with a float lr and with a tensor lr.

Checked on the CPU with a `TorchDispatchMode` that fails on every operation reading a tensor's
value into Python (on a GPU each would make the host wait for the device's queue); the GPU check
(`torch.cuda.set_sync_debug_mode("error")`, CUDA-graph capture) is in tests/test_cuda.py.
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
