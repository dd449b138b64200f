"""Whole-model transforms: steps that see every gradient at once, around any torch optimizer.

    from optcraft.transforms import Transformed, clip_by_global_norm, skip_nonfinite, accumulate
    opt = Transformed(torch.optim.AdamW(model.parameters(), lr=1e-3),
                      skip_nonfinite(), accumulate(4), clip_by_global_norm(1.0))

`Transformed(opt, *transforms)` is a `torch.optim.Optimizer` sharing `opt`'s `param_groups` and
`state` (so torch's schedulers, hooks and checkpoints see one optimizer).  At each `step()` the
transforms run in the order given, on the gradients of every parameter of `opt`; each may change
the gradients in place or stop the step, in which case `opt.step()` is not called, no parameter
and no optimizer state changes, and later transforms do not run.  `transformed.stepped` says
whether the last `step()` reached the optimizer.

* `clip_by_global_norm(max_norm)`: torch's `clip_grad_norm_` (gradients scaled by
  `min(1, max_norm / (total_norm + 1e-6))`, `total_norm` the L2 norm of all gradients).
* `adaptive_clip(clipping=0.01, eps=1e-3)`: Brock et al.'s unit-wise adaptive gradient clipping.
* `skip_nonfinite()`: stop the step when a gradient holds a NaN or an infinity (counted in
  `.skips`).
* `accumulate(k)`: hold the gradients of k steps, then step once on their mean.

Order matters and is the one written: `skip_nonfinite(), accumulate(4)` drops a bad micro-batch
and goes on accumulating; `accumulate(4), skip_nonfinite()` drops the whole window; clipping after
`accumulate` clips the mean, before it clips each micro-batch.

With `accumulate(k)` the optimizer steps once every k calls: an optcraft schedule counts optimizer
steps (it sees k times fewer); a torch lr_scheduler counts its own `step()` calls, so call it when
`transformed.stepped` is True.

The transforms' state (the skip count, the accumulation buffers and count) is saved in the
state dict under `'transforms'` (tensors and numbers only: `torch.load(weights_only=True)` reads
it), and resuming from it continues bit for bit.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterable

import torch

from . import hypers as hp, precision
from .optimizer import _FastaiAPI
from .wrappers import _Delegating

__all__ = ["Transform", "Transformed", "clip_by_global_norm", "adaptive_clip", "skip_nonfinite",
           "accumulate", "unitwise_norm"]


class Transform:
    """One whole-model step on the gradients.

    `__call__(params)` gets every parameter of the optimizer (some with `grad=None`), may change
    their gradients in place, and returns True to go on or False to stop the step.  State that
    must survive a checkpoint goes through `state_dict(index)` (`index`: parameter -> its number
    in the optimizer's state dict) and `load_state_dict(state, params)`, after `check_state`
    raised nothing.
    """

    def __call__(self, params: list[torch.Tensor]) -> bool:
        raise NotImplementedError

    def state_dict(self, index: dict[torch.Tensor, int]) -> dict[str, Any]:
        return {}

    def check_state(self, state: dict, params: list[torch.Tensor]) -> None:
        """Raise ValueError if `state` does not fit; change nothing."""

    def load_state_dict(self, state: dict, params: list[torch.Tensor]) -> None:
        pass

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def _grads(params) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def _largest_magnitudes(grads: list) -> list[torch.Tensor]:
    """The largest magnitude in each gradient, as plain 0-d tensors.  FSDP2's gradients (DTensors)
    go through `distributed.sharded_norms`: the maximum over the whole tensor, the same on every
    rank (so every rank skips the same steps), with one all-reduce, and a rank whose shard is
    empty takes no part (torch has no max norm of an empty tensor)."""
    from .distributed import distribution_of, sharded_norms

    if distribution_of(grads[0]) is None:
        return torch._foreach_norm(grads, math.inf)
    found = []
    by_layout: dict = {}
    for g in grads:
        by_layout.setdefault(distribution_of(g), []).append(g)
    for layout, same in by_layout.items():
        norms = sharded_norms(same, math.inf) if layout is not None else None
        if norms is None:  # plain tensors, or a layout sharded_norms does not take
            norms = [n.full_tensor() if distribution_of(n) is not None else n
                     for n in torch._foreach_norm(same, math.inf)]
        found.extend(n.to_local() if distribution_of(n) is not None else n for n in norms)
    return found


def _check_positive(who: str, name: str, value, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{who}: {name} must be a real number, got {type(value).__name__} "
                        f"{value!r}")
    ok = value >= 0 if allow_zero else value > 0
    if not ok or math.isnan(value) or math.isinf(value):
        raise ValueError(f"{who}: {name} must be {'>= 0' if allow_zero else '> 0'} and finite, "
                         f"got {value!r}")
    return float(value)


class clip_by_global_norm(Transform):
    """Scale every gradient by `min(1, max_norm / (total_norm + 1e-6))`, where `total_norm` is
    the L2 norm of all gradients together (torch's `clip_grad_norm_`, which it calls).  The norm
    before clipping is kept in `.last_norm` (a 0-d tensor) for logging."""

    def __init__(self, max_norm: float):
        self.max_norm = _check_positive("clip_by_global_norm", "max_norm", max_norm)
        self.last_norm = None

    def __call__(self, params):
        grads = [p for p in params if p.grad is not None]
        if grads:
            self.last_norm = torch.nn.utils.clip_grad_norm_(grads, self.max_norm)
        return True


def unitwise_norm(t: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each unit of `t`: of the whole tensor for scalars and vectors (biases,
    gains), else of each slice along the first dimension (an output unit of torch's weights,
    `(out, in, ...)`), shaped to broadcast against `t`."""
    if t.dim() <= 1:
        return torch.linalg.vector_norm(t)
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim())), keepdim=True)


class adaptive_clip(Transform):
    """Adaptive gradient clipping (Brock et al., 2021, "High-Performance Large-Scale Image
    Recognition Without Normalization", arXiv:2102.06171), unit by unit:

    `g <- g * clipping * max(|w|, eps) / |g|` where `|g| / max(|w|, eps) > clipping`, with `|.|`
    the `unitwise_norm`.  The paper leaves the final classifier unclipped: pass its parameters
    as `exclude`.
    """

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3,
                 exclude: Iterable[torch.Tensor] = ()):
        self.clipping = _check_positive("adaptive_clip", "clipping", clipping)
        self.eps = _check_positive("adaptive_clip", "eps", eps, allow_zero=True)
        self.exclude = list(exclude)
        if not all(isinstance(t, torch.Tensor) for t in self.exclude):
            raise TypeError("adaptive_clip: exclude must hold parameters (tensors)")

    def __call__(self, params):
        excluded = {id(t) for t in self.exclude}
        for p in params:
            if p.grad is None or id(p) in excluded:
                continue
            g = p.grad
            max_norm = unitwise_norm(p.detach()).clamp_min(self.eps).mul_(self.clipping)
            g_norm = unitwise_norm(g)
            # the 1e-6 floor only guards the division; where it acts the gradient is not clipped
            scale = max_norm / g_norm.clamp_min(1e-6)
            g.copy_(torch.where(g_norm > max_norm, g * scale, g))
        return True


class skip_nonfinite(Transform):
    """Stop the step when any gradient holds a NaN or an infinity: the optimizer does not step,
    so no parameter, no optimizer state and no schedule moves.  `.skips` counts the skipped
    steps (saved in the state dict); `.last_skipped` says whether the last call skipped."""

    def __init__(self):
        self.skips = 0
        self.last_skipped = False

    def __call__(self, params):
        grads = _grads(params)
        finite = True
        if grads:
            # the largest magnitude is NaN or inf exactly when some element is, and never
            # overflows (a sum or an L2 norm of large finite half-precision values can)
            biggest = _largest_magnitudes(grads)
            devices = {t.device for t in biggest}
            checks = [torch.isfinite(torch.stack([t for t in biggest if t.device == d])).all()
                      for d in devices]
            finite = all(bool(c) for c in checks)
        self.last_skipped = not finite
        self.skips += not finite
        return finite

    def state_dict(self, index):
        return {"skips": self.skips}

    def check_state(self, state, params):
        skips = state.get("skips")
        if isinstance(skips, bool) or not isinstance(skips, int) or skips < 0:
            raise ValueError(f"skip_nonfinite: 'skips' must be an integer >= 0, got {skips!r}")

    def load_state_dict(self, state, params):
        self.skips = state["skips"]


class accumulate(Transform):
    """Gradient accumulation: the first k-1 of every k calls add the gradients to buffers and stop
    the step; the k-th writes the mean of the k gradients into `.grad` and lets the step go on.

    Call `zero_grad()` every micro-batch as usual (the sums live in the buffers, not in `.grad`).
    A parameter without a gradient in some micro-batches counts zeros for them (the mean is over
    k).  Half-precision gradients are summed in float32.
    """

    def __init__(self, k: int):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"accumulate: k must be an integer >= 1, got {k!r}")
        self.k = k
        self.count = 0
        # parameter -> sum of its gradients (tensors are keyed by identity, as in torch's state)
        self._buffers: dict[torch.Tensor, torch.Tensor] = {}

    def __call__(self, params):
        for p in params:
            if p.grad is None:
                continue
            buf = self._buffers.get(p)
            if buf is None:
                dtype = torch.float32 if p.grad.dtype in precision.LOW_PRECISION else p.grad.dtype
                self._buffers[p] = p.grad.detach().to(dtype, copy=True)
            else:
                buf.add_(p.grad)
        self.count += 1
        if self.count < self.k:
            return False
        for p in params:
            buf = self._buffers.get(p)
            if buf is None:
                continue
            mean = buf.div_(self.k)
            if p.grad is None:
                p.grad = mean.to(p.dtype)
            else:
                p.grad.copy_(mean)
        self._buffers.clear()
        self.count = 0
        return True

    def state_dict(self, index):
        buffers = {}
        for p, i in index.items():
            buf = self._buffers.get(p)
            if buf is not None:
                buffers[i] = buf
        return {"k": self.k, "count": self.count, "buffers": buffers}

    def check_state(self, state, params):
        count, buffers, k = state.get("count"), state.get("buffers"), state.get("k")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"accumulate: 'count' must be an integer >= 0, got {count!r}")
        if count and k != self.k:
            raise ValueError(f"accumulate: the state dict is {count} steps into a window of "
                             f"k={k}; this transform has k={self.k}")
        if count >= self.k:
            raise ValueError(f"accumulate: the state dict has count {count}, which is not below "
                             f"k={self.k}")
        if not isinstance(buffers, dict):
            raise ValueError("accumulate: 'buffers' must be a dict of parameter number -> tensor")
        for i, buf in buffers.items():
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(params):
                raise ValueError(f"accumulate: buffer for parameter {i!r}, which the optimizer "
                                 f"does not have ({len(params)} parameters)")
            if not isinstance(buf, torch.Tensor) or buf.shape != params[i].shape:
                shape = tuple(buf.shape) if isinstance(buf, torch.Tensor) else type(buf).__name__
                raise ValueError(f"accumulate: buffer for parameter {i} has shape {shape}, the "
                                 f"parameter has {tuple(params[i].shape)}")

    def load_state_dict(self, state, params):
        self.count = state["count"]
        self._buffers = {params[i]: buf.detach().to(device=params[i].device, copy=True)
                         for i, buf in state["buffers"].items()}


class Transformed(_Delegating):
    """`opt` with whole-model transforms run before each of its steps (see the module docstring).

    `opt` is any `torch.optim.Optimizer` (optcraft's or torch's, or a wrapper).  Put the
    transforms outermost: `Transformed(Lookahead(...), ...)`, so a skipped step is skipped by the
    wrapper too.
    """

    def __init__(self, opt: torch.optim.Optimizer, *transforms: Transform):
        for t in transforms:
            if not isinstance(t, Transform):
                raise TypeError(f"Transformed: every transform must be an optcraft.transforms "
                                f"transform (clip_by_global_norm, adaptive_clip, skip_nonfinite, "
                                f"accumulate, or a Transform subclass), got {t!r}")
        self._init_torch_parts(opt)
        self.transforms = list(transforms)
        self.stepped = False

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def hypers(self):
        inner = getattr(self.opt, "hypers", None)
        return inner if inner is not None else [hp.HyperView(g) for g in self.param_groups]

    def set_hypers(self, **kwargs) -> None:
        inner = getattr(self.opt, "set_hypers", None)
        if inner is not None:
            inner(**kwargs)
        else:
            _FastaiAPI.set_hypers(self, **kwargs)

    def _set_hyper(self, k, values) -> None:
        for group, v in zip(self.param_groups, values):
            group[k] = v

    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._params()
        self.stepped = False
        with torch.no_grad():
            for transform in self.transforms:
                if not transform(params):
                    return loss
        self.opt.step()
        self.stepped = True
        return loss

    def clear_state(self) -> None:
        """Forget the optimizer's state (through its own `clear_state` where it has one, which
        keeps fastai's flags); the transforms keep theirs."""
        (getattr(self.opt, "clear_state", None) or self.opt.state.clear)()

    def _state_dict(self) -> dict[str, Any]:
        sd = self.opt.state_dict()
        index = {p: i for i, p in enumerate(self._params())}
        sd["transforms"] = [{"name": type(t).__name__, **t.state_dict(index)}
                            for t in self.transforms]
        return sd

    def _load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("transforms", None)
        if saved is None:
            raise ValueError("the state dict has no transform state ('transforms'): it is not a "
                             "Transformed optimizer's; to load a plain optimizer's checkpoint, "
                             "load it into the inner optimizer (transformed.opt.load_state_dict)")
        names = [type(t).__name__ for t in self.transforms]
        saved_names = [s.get("name") if isinstance(s, dict) else None for s in saved] \
            if isinstance(saved, list) else None
        if saved_names != names:
            raise ValueError(f"the state dict's transforms are {saved_names}, this optimizer's "
                             f"are {names}")
        params = self._params()
        for t, s in zip(self.transforms, saved):
            t.check_state(s, params)
        self.opt.load_state_dict(state_dict)
        for t, s in zip(self.transforms, saved):
            t.load_state_dict(s, params)

    def __repr__(self) -> str:
        return f"Transformed({', '.join(map(repr, self.transforms))}) of {self.opt!r}"
