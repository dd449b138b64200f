"""Shared by test_torch_family.py and test_modern_elementwise.py: one small problem (four tensors
in two parameter groups with hyperparameters of their own, gradients missing at some steps, the
first tensor's first gradient at step 2), run by an optimizer (with a checkpoint taken and loaded
into a fresh optimizer mid-run if asked) or by a per-element reference written with Python
floats."""
from __future__ import annotations

import io

import torch

SHAPES = [(6, 5), (5,), (3, 4, 2), (7,)]
GROUP_OF = [0, 0, 1, 1]


def make_params(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
            for s in SHAPES]


def gradients(n_steps, dtype=torch.float64):
    """One list of gradients per step; tensor j has none at steps i with (i + j) % 4 == 0."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n_steps):
        row = []
        for j, s in enumerate(SHAPES):
            grad = torch.randn(s, generator=g, dtype=torch.float64).to(dtype)
            row.append(None if (i + j) % 4 == 0 else grad)
        out.append(row)
    return out


def groups_of(params, hypers):
    return [{"params": [p for p, k in zip(params, GROUP_OF) if k == i], **h}
            for i, h in enumerate(hypers)]


def roundtrip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def train(build, hypers, n_steps=20, checkpoint_at=None, dtype=torch.float64, opts=None):
    """The parameters after `n_steps` steps of `build(param_groups)`; with `checkpoint_at`, the
    optimizer's state_dict is saved after that step (torch.save / torch.load(weights_only=True))
    and loaded into a fresh optimizer that takes the steps after it.  The optimizer that took
    the last step is appended to `opts` (a list) if given."""
    params = make_params(dtype)
    opt = build(groups_of(params, hypers))
    for i, grads in enumerate(gradients(n_steps, dtype)):
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        opt.step()
        if checkpoint_at == i + 1:
            saved = roundtrip(opt.state_dict())
            opt = build(groups_of(params, hypers))
            opt.load_state_dict(saved)
    if opts is not None:
        opts.append(opt)
    return [p.detach().clone() for p in params]


def assert_compiled(opt):
    """The compiled path traced and compiled the chain (no piece fell back to eager)."""
    path = opt.path
    assert path.name == "compiled" and path.functions and not path.untraceable
    assert all(len(fn.graphs) == 1 for fn in path.functions.values())


def run_per_element(ref_step, hypers, n_steps=20):
    """A per-element reference: `ref_step(state, p, g, h)` takes one tensor's values and gradient
    as lists of Python floats (its own `state` dict, its group's hyperparameters `h`) and returns
    the new values."""
    params = [p.detach().flatten().tolist() for p in make_params()]
    states = [{} for _ in params]
    for grads in gradients(n_steps):
        for k, g in enumerate(grads):
            if g is not None:
                params[k] = ref_step(states[k], params[k], g.flatten().tolist(),
                                     hypers[GROUP_OF[k]])
    return [torch.tensor(p, dtype=torch.float64).view(s) for p, s in zip(params, SHAPES)]


def assert_same(ours, theirs, rtol=1e-10, atol=1e-12):
    """Equal to 1e-10 relative (float64: the eager paths agree with the references to about
    1e-15); the compiled path is held to 1e-6."""
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
