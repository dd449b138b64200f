"""Every named optimizer, on a CUDA device, in every impl, gives the CPU reference path's numbers.

Skipped where torch sees no CUDA device (CI has none); run on a GPU machine with
`pytest tests/test_cuda.py`.  The reference path (one parameter at a time, on the CPU) is itself
checked against torch.optim and per-element formulas elsewhere; here the vectorised, fused and
compiled paths run their CUDA kernels (torch's foreach and fused ones, inductor's Triton code) in
float64 over 12 steps, two groups, gradients missing on some steps, and must agree to 1e-6.
"""
from __future__ import annotations

import pytest
import torch

from optcraft import registry

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Small tensors and one of 70,400 elements: past `compiler_hints.PER_TENSOR_MIN_NUMEL`, so the
# compiled path compiles it (norms by rows included) and runs the others on the foreach path.
SHAPES = [(6, 5), (5,), (3, 4, 2), (275, 256), (7,), ()]
STEPS = 12


def run(name: str, impl: str, device: str):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g, dtype=torch.float64).to(device).requires_grad_()
              for s in SHAPES]
    opt = registry.get(name).make([params[:3], params[3:]], impl=impl)
    for i in range(STEPS):
        for j, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.grad = None if (i + j) % 5 == 0 else grad.to(device)
        opt.step()
    return params, opt


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["foreach", "auto", "fused", "compiled"])
@pytest.mark.parametrize("name", registry.names())
def test_cuda_paths_give_the_cpu_reference_numbers(name, impl):
    try:
        params, opt = run(name, impl, "cuda")
    except ValueError as error:
        assert impl == "fused" and "no fused kernel" in str(error)
        pytest.skip(f"{name} has no fused kernel")
    ref_params, ref_opt = run(name, "reference", "cpu")
    for p, q in zip(params, ref_params):
        assert p.device.type == "cuda"
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=1e-6, atol=1e-10)
        for k, v in ref_opt.state[q].items():
            got = opt.state[p][k]
            if isinstance(v, torch.Tensor):
                assert got.device == p.device, k
                torch.testing.assert_close(got.cpu(), v, rtol=1e-6, atol=1e-10)
            else:
                assert got == v, k


def step_without_waiting(opt) -> None:
    """One step under `set_sync_debug_mode("error")`: a host-device synchronisation raises."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.slow
@pytest.mark.parametrize("name,impl", [("Adam", "auto"), ("Adam", "foreach"), ("Adam", "compiled"),
                                       ("Lamb", "foreach"), ("Lamb", "compiled")])
def test_cuda_step_never_waits_for_the_device(name, impl):
    """A step launches its kernels and returns without waiting for the device: nothing in it (a
    step count read back with `.item()`, say) synchronises with the GPU."""
    params, opt = run(name, impl, "cuda")
    for _ in range(3):  # every gradient present: new kinds of piece, compiled from the next step
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    step_without_waiting(opt)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["reference", "foreach", "auto"])
@pytest.mark.parametrize("name", registry.names())
def test_cuda_step_with_a_tensor_lr_never_waits_for_the_device(name, impl):
    """Every named optimizer on the eager paths, a tensor lr on the device included: a step under
    `set_sync_debug_mode("error")` makes no host-device synchronisation."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).cuda().requires_grad_() for s in SHAPES]
    entry = registry.get(name)
    opt = entry.make(params, lr=torch.tensor(entry.lr, device="cuda"), impl=impl)
    for _ in range(2):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    step_without_waiting(opt)


@pytest.mark.slow
@pytest.mark.parametrize("name,settings", [("SGD", {"mom": 0.9}), ("RMSProp", {}), ("Larc", {}),
                                           ("Adam", {"capturable": True}),
                                           ("RAdam", {"capturable": True})])
@pytest.mark.parametrize("impl", ["foreach", "auto"])
def test_cuda_graph_capture_of_a_step_replays_the_eager_steps(name, settings, impl):
    """`torch.cuda.graph` around `opt.step()` with static gradients (torch's recipe: warm-up steps
    on a side stream make the state, then capture), replayed, equals the eager steps; the tensor
    lr is read from device memory, so a scheduler's in-place change reaches the replays.  Chains
    that count steps do so on the device with `capturable=True` (docs/integration.md); the
    eager reference counts in Python."""
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(s, generator=g) for s in SHAPES]
    grads = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(8)]

    def make():
        params = [d.clone().cuda().requires_grad_() for d in data]
        lr = torch.tensor(0.01, device="cuda")
        return params, lr, registry.get(name).factory(params, lr=lr, impl=impl, **settings)

    params, lr, opt = make()
    settings = {k: v for k, v in settings.items() if k != "capturable"}  # (reference: Python counts)
    ref_params, ref_lr, ref_opt = make()
    static = [torch.zeros_like(p) for p in params]
    for p, s in zip(params, static):
        p.grad = s
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):
            for s, gr in zip(static, grads[i]):
                s.copy_(gr)
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for i in range(3):
        for p, gr in zip(ref_params, grads[i]):
            p.grad = gr.cuda()
        ref_opt.step()
    for i in range(3, 8):
        if i == 5:
            lr.fill_(0.005)
            ref_lr.fill_(0.005)
        for s, gr in zip(static, grads[i]):
            s.copy_(gr)
        graph.replay()
        for p, gr in zip(ref_params, grads[i]):
            p.grad = gr.cuda()
        ref_opt.step()
    torch.cuda.synchronize()
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p.detach(), q.detach())
