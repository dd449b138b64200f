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
