"""The ``fused`` path: a chain that is exactly one of torch's fused optimizer kernels runs as it.

torch ships single-kernel implementations of SGD, Adam/AdamW and Adagrad (`torch._fused_sgd_`,
`torch._fused_adam_`, `torch._fused_adamw_`, `torch._fused_adagrad_`, on CPU and CUDA).  They read and write each tensor
once, which is the memory floor of the step.  `recognise(chain)` matches a chain's blocks (their specifications' names and bound
keywords) against them:

* ``[weight_decay | l2_reg, average_grad(dampening=True), average_sqr_grad, step_stat, adam_step]``
  is AdamW (decoupled decay) or Adam (L2 decay);
* ``[weight_decay | l2_reg, sgd_step]`` and ``[weight_decay | l2_reg, average_grad, momentum_step]``
  are SGD without and with momentum (momentum off while `mom` is 0, as `average_grad` has it),
  ``[.., average_grad, nesterov_step]`` SGD with Nesterov's momentum (torch's `nesterov=True`:
  `p <- p - lr * (g + mom * grad_avg)`);
* ``[l2_reg | weight_decay, sum_sqr_grad, step_stat, adagrad_step]`` is Adagrad (torch's kernel
  adds `wd * p` to the gradient; the decoupled form multiplies the parameters first).

The state keeps optcraft's names (`grad_avg`, `sqr_avg`, `step` as an int), so a checkpoint
written by one path loads into any other.  A chain matching none of these has no fused form;
`Optimizer(impl="fused")` then raises and `impl="auto"` uses the foreach path.  FSDP2's sharded
parameters run the kernel on each rank's local shards (the kernels are elementwise).  Where the
kernel cannot take a bucket (non-contiguous tensors, a state tensor laid out otherwise than its
parameter) it runs on the foreach path.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..blocks.base import is_zero
from ..distributed import distribution_of
from ..tensorlist import ParamList, TensorList
from .chain import Chain, Stage
from .foreach import ForeachPath


def _shape(chain: Chain) -> list[tuple[str | None, dict]]:
    """The chain as (block name, bound keywords) pairs, for matching (None: a plain callback)."""
    return [(spec.name if spec is not None else None, bound) for spec, bound in chain.specs]


def recognise(chain: Chain) -> Callable | None:
    """The fused step function for the chain, or None when torch has no kernel for it."""
    found = _shape(chain)
    if len(found) < 2 or found[0][0] not in ("weight_decay", "l2_reg") or found[0][1]:
        return None
    decoupled = found[0][0] == "weight_decay"
    names = [name for name, _ in found[1:]]
    bound = [b for _, b in found[1:]]
    if names == ["average_grad", "average_sqr_grad", "step_stat", "adam_step"] and \
            bound[0] == {"dampening": True} and bound[1] in ({}, {"dampening": True}) and \
            not bound[2] and not bound[3]:
        return lambda *args: _adam(*args, decoupled=decoupled)
    if names == ["sgd_step"] and not bound[0]:
        return lambda *args: _sgd(*args, decoupled=decoupled, momentum=False)
    if names in (["average_grad", "momentum_step"], ["average_grad", "nesterov_step"]) \
            and bound[0] in ({}, {"dampening": False}) and not bound[1]:
        nesterov = names[1] == "nesterov_step"
        return lambda *args: _sgd(*args, decoupled=decoupled, momentum=True, nesterov=nesterov)
    if names == ["sum_sqr_grad", "step_stat", "adagrad_step"] and not any(bound):
        return lambda *args: _adagrad(*args, decoupled=decoupled)
    return None


class FusedPath(ForeachPath):
    """torch's fused kernel for the chain's one stage; the foreach path where it cannot run."""

    name = "fused"

    def __init__(self, chain: Chain):
        super().__init__(chain)
        self.kernel = recognise(chain)
        if self.kernel is None:
            raise ValueError(f"impl='fused': torch has no fused kernel for the chain {chain!r} "
                             f"(only SGD, Adam/AdamW and Adagrad chains have one); use impl='auto', "
                             f"'foreach' or 'compiled'")

    def run(self, stage: Stage, bucket, params: ParamList, values: dict, hyper: dict) -> dict:
        if distribution_of(bucket.params[0]) is not None:
            return self._run_on_shards(stage, bucket, params, values, hyper)
        if not layouts_match(params.tensors, params.grad.tensors, values):
            return super().run(stage, bucket, params, values, hyper)
        return {**values, **self.kernel(values, hyper, params.tensors, params.grad.tensors)}

    def _run_on_shards(self, stage: Stage, bucket, params: ParamList, values: dict,
                       hyper: dict) -> dict:
        """FSDP2's sharded parameters (DTensors): DTensor has no sharding rule for torch's fused
        kernels (torch 2.13), but they are elementwise, so they run on each rank's local shards
        (`to_local()`, the same memory) of the parameters, gradients and state, where every one
        of them is laid out as its parameter; the state they make is wrapped back into DTensors
        laid out as the parameters (what torch.distributed.checkpoint saves and reshards).
        Elsewhere (a pending-sum or differently laid out tensor) the chain runs on the foreach
        path."""
        from torch.distributed.tensor import DTensor

        layout = distribution_of(bucket.params[0])
        mesh, placements = layout
        states = {k: v for k, v in values.items() if isinstance(v, TensorList)}
        everything = [*params.tensors, *params.grad.tensors,
                      *(t for v in states.values() for t in v.tensors)]
        if any(p.is_partial() for p in placements) or \
                any(distribution_of(t) != layout for t in everything):
            return super().run(stage, bucket, params, values, hyper)
        local = {k: TensorList([t.to_local() for t in v.tensors]) for k, v in states.items()}
        local_params = [p.to_local() for p in params.tensors]
        local_grads = [g.to_local() for g in params.grad.tensors]
        if not layouts_match(local_params, local_grads, local):
            return super().run(stage, bucket, params, values, hyper)
        made = self.kernel({**values, **local}, hyper, local_params, local_grads)
        found = dict(values)
        for key, value in made.items():
            if not isinstance(value, TensorList):
                found[key] = value
            elif key in states:  # (updated in place, through the local shards)
                found[key] = states[key]
            else:  # made at this step: laid out as the parameters
                found[key] = TensorList([
                    DTensor.from_local(t, mesh, placements, run_check=False, shape=p.shape,
                                       stride=p.stride())
                    for t, p in zip(value.tensors, params.tensors)])
        return found


def layouts_match(params, grads, values) -> bool:
    """Whether torch's kernels may run the bucket: they pair the elements of a parameter, its
    gradient and its state by memory order, so all must be contiguous (a non-contiguous
    parameter, or a gradient assigned with other strides, runs on the foreach path instead)."""
    if not all(t.is_contiguous() for t in params) or not all(g.is_contiguous() for g in grads):
        return False
    return all(t.is_contiguous() for v in values.values() if isinstance(v, TensorList)
               for t in v.tensors)


def _decay(values, hyper) -> float:
    """The weight decay for this bucket: 0 where the parameters' state says `do_wd=False`."""
    return hyper["wd"] if values.get("do_wd", True) else 0.0


def _state_like(values, views, key) -> list[torch.Tensor]:
    """The state tensors `key` of a bucket, created as zeros on first use."""
    found = values.get(key)
    if found is None:
        return [torch.zeros_like(v, memory_format=torch.preserve_format) for v in views]
    return list(found.tensors)


def _adam(values, hyper, params, grads, *, decoupled: bool) -> dict:
    """Adam/AdamW through torch's fused kernel.  torch's kernel takes the step count after the
    increment, as a float tensor per parameter; one shared 0-d tensor serves the bucket, since
    the kernel only reads it (torch.optim increments its own step tensors outside the kernel)."""
    step = values.get("step", 0) + 1
    grad_avg = _state_like(values, params, "grad_avg")
    sqr_avg = _state_like(values, params, "sqr_avg")
    steps = [torch.full((), float(step), dtype=torch.float32, device=params[0].device)] * \
        len(params)
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
    kernel(params, grads, _real(grad_avg), _real(sqr_avg), [], steps, lr=hyper["lr"],
           beta1=hyper["mom"], beta2=hyper["sqr_mom"], weight_decay=_decay(values, hyper),
           eps=hyper["eps"], amsgrad=False, maximize=False)
    return {"grad_avg": TensorList(grad_avg), "sqr_avg": TensorList(sqr_avg), "step": step}


def _sgd(values, hyper, params, grads, *, decoupled: bool, momentum: bool,
         nesterov: bool = False) -> dict:
    """SGD through torch's fused kernel.  torch's weight decay is L2 (added to the gradient); the
    decoupled form multiplies the parameters first, in one foreach pass.  Momentum is off while
    `mom` is 0 (no buffer is made, and one that exists is left as it is), as `average_grad` and
    torch's SGD have it."""
    wd = _decay(values, hyper)
    if decoupled and wd != 0:
        TensorList(params).mul_(1 - hyper["lr"] * wd)
        wd = 0.0
    # A zero buffer with is_first_step=False gives buf = mom * 0 + g = g on the first step, as
    # optcraft's average_grad does (torch copies the gradient there instead: the same numbers).
    momentum = momentum and not is_zero(hyper["mom"])
    grad_avg = _state_like(values, params, "grad_avg") if momentum else []
    torch._fused_sgd_(params, grads, _real(grad_avg), weight_decay=wd,
                      momentum=hyper["mom"] if momentum else 0.0, lr=hyper["lr"], dampening=0.0,
                      nesterov=nesterov, maximize=False, is_first_step=False)
    return {"grad_avg": TensorList(grad_avg)} if momentum else {}


def _adagrad(values, hyper, params, grads, *, decoupled: bool) -> dict:
    """Adagrad through torch's fused kernel, which reads the step count after the increment (a
    float tensor per parameter, as for Adam) and adds `wd * p` to the gradient; the decoupled
    form multiplies the parameters first, in one foreach pass.  The accumulator starts at
    `initial_accumulator_value`."""
    wd = _decay(values, hyper)
    if decoupled and wd != 0:
        TensorList(params).mul_(1 - hyper["lr"] * wd)
        wd = 0.0
    step = values.get("step", 0) + 1
    sqr_avg = values.get("sqr_avg")
    sqr_avg = list(sqr_avg.tensors) if sqr_avg is not None else \
        [torch.full_like(p, hyper["initial_accumulator_value"],
                         memory_format=torch.preserve_format) for p in params]
    steps = [torch.full((), float(step), dtype=torch.float32, device=params[0].device)] * \
        len(params)
    torch._fused_adagrad_(params, grads, _real(sqr_avg), steps, lr=hyper["lr"],
                          lr_decay=hyper["lr_decay"], weight_decay=wd, eps=hyper["eps"],
                          maximize=False)
    return {"sqr_avg": TensorList(sqr_avg), "step": step}


def _real(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.view_as_real(t) if t.is_complex() else t for t in tensors]
