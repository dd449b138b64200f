"""The ``fused`` path: a chain that is exactly one of torch's fused optimizer kernels runs as it.

torch ships single-kernel implementations of SGD and Adam/AdamW (`torch._fused_sgd_`,
`torch._fused_adam_`, `torch._fused_adamw_`, on CPU and CUDA).  They read and write each tensor
once, which is the memory floor of the step.  `recognise(cbs)` matches a chain against them:

* ``[weight_decay | l2_reg, average_grad(dampening=True), average_sqr_grad, step_stat, adam_step]``
  is AdamW (decoupled decay) or Adam (L2 decay);
* ``[weight_decay | l2_reg, sgd_step]`` and ``[weight_decay | l2_reg, average_grad, momentum_step]``
  are SGD without and with momentum, ``[.., average_grad, nesterov_step]`` SGD with Nesterov's
  momentum (torch's `nesterov=True`: `p <- p - lr * (g + mom * grad_avg)`).

The state keeps optcraft's names (`grad_avg`, `sqr_avg`, `step` as an int), so a checkpoint
written by one path loads into any other.  A chain matching none of these has no fused form;
`Optimizer(impl="fused")` then raises and `impl="auto"` uses the foreach path.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .blocks.base import unwrap_partial
from .blocks.decay import l2_reg, weight_decay
from .blocks.stats import average_grad, average_sqr_grad, step_stat
from .blocks.sign import nesterov_step
from .blocks.steps import adam_step, momentum_step, sgd_step
from .tensorlist import TensorList


def _shape(cbs: Sequence[Callable]) -> list[tuple]:
    """The chain as (function, bound keywords) pairs, for matching."""
    return [unwrap_partial(cb) for cb in cbs]


def recognise(cbs: Sequence[Callable]) -> Callable | None:
    """The fused step function for the chain `cbs`, or None when torch has no kernel for it."""
    chain = _shape(cbs)
    if len(chain) < 2 or chain[0][0] not in (weight_decay, l2_reg) or chain[0][1]:
        return None
    decoupled = chain[0][0] is weight_decay
    rest = chain[1:]
    if [fn for fn, _ in rest] == [average_grad, average_sqr_grad, step_stat, adam_step] and \
            rest[0][1] == {"dampening": True} and rest[1][1] in ({}, {"dampening": True}) and \
            not rest[2][1] and not rest[3][1]:
        return lambda *args: _adam(*args, decoupled=decoupled)
    if [fn for fn, _ in rest] == [sgd_step] and not rest[0][1]:
        return lambda *args: _sgd(*args, decoupled=decoupled, momentum=False)
    if [fn for fn, _ in rest] in ([average_grad, momentum_step], [average_grad, nesterov_step]) \
            and rest[0][1] in ({}, {"dampening": False}) and not rest[1][1]:
        nesterov = rest[1][0] is nesterov_step
        return lambda *args: _sgd(*args, decoupled=decoupled, momentum=True, nesterov=nesterov)
    return None


def layouts_match(params, grads, bucket, state) -> bool:
    """Whether torch's kernels may run the bucket: they pair the elements of a parameter, its
    gradient and its state by memory order, so all must be contiguous (a non-contiguous
    parameter, or a gradient assigned with other strides, runs on the foreach path instead)."""
    if not all(t.is_contiguous() for t in params) or not all(g.is_contiguous() for g in grads):
        return False
    states = [state[p] for p in bucket.params]
    return all(st[k].is_contiguous() for k in bucket.tensor_keys for st in states)


def _decay(bucket, hyper) -> float:
    """The weight decay for this bucket: 0 where the parameters' state says `do_wd=False`."""
    return hyper["wd"] if bucket.scalars.get("do_wd", True) else 0.0


def _state_like(state, params, views, key) -> list[torch.Tensor]:
    """The state tensors `key` of a bucket, created as zeros on first use."""
    found = []
    for p, view in zip(params, views):
        t = state[p].get(key)
        found.append(torch.zeros_like(view, memory_format=torch.preserve_format)
                     if t is None else t)
    return found


def _adam(bucket, state, hyper, params, grads, *, decoupled: bool) -> dict:
    """Adam/AdamW through torch's fused kernel.  torch's kernel takes the step count after the
    increment, as a float tensor per parameter; one shared 0-d tensor serves the bucket, since
    the kernel only reads it (torch.optim increments its own step tensors outside the kernel)."""
    step = bucket.scalars.get("step", 0) + 1
    grad_avg = _state_like(state, bucket.params, params, "grad_avg")
    sqr_avg = _state_like(state, bucket.params, params, "sqr_avg")
    steps = [torch.full((), float(step), dtype=torch.float32, device=params[0].device)] * \
        len(params)
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
    kernel(params, grads, _real(grad_avg), _real(sqr_avg), [], steps, lr=hyper["lr"],
           beta1=hyper["mom"], beta2=hyper["sqr_mom"], weight_decay=_decay(bucket, hyper),
           eps=hyper["eps"], amsgrad=False, maximize=False)
    return {"grad_avg": TensorList(grad_avg), "sqr_avg": TensorList(sqr_avg), "step": step}


def _sgd(bucket, state, hyper, params, grads, *, decoupled: bool, momentum: bool,
         nesterov: bool = False) -> dict:
    """SGD through torch's fused kernel.  torch's weight decay is L2 (added to the gradient); the
    decoupled form multiplies the parameters first, in one foreach pass."""
    wd = _decay(bucket, hyper)
    if decoupled and wd != 0:
        TensorList(params).mul_(1 - hyper["lr"] * wd)
        wd = 0.0
    # A zero buffer with is_first_step=False gives buf = mom * 0 + g = g on the first step, as
    # optcraft's average_grad does (torch copies the gradient there instead: the same numbers).
    grad_avg = _state_like(state, bucket.params, params, "grad_avg") if momentum else []
    torch._fused_sgd_(params, grads, _real(grad_avg), weight_decay=wd,
                      momentum=hyper["mom"] if momentum else 0.0, lr=hyper["lr"], dampening=0.0,
                      nesterov=nesterov, maximize=False, is_first_step=False)
    return {"grad_avg": TensorList(grad_avg)} if momentum else {}


def _real(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.view_as_real(t) if t.is_complex() else t for t in tensors]
