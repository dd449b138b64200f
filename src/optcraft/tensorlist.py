"""Vectorised arithmetic over lists of tensors.

A building block is written once, against `TensorList`, and runs the same way on one parameter
(a list of one) and on every parameter of a bucket at once.  Each method maps onto one
`torch._foreach_*` call where torch has one, so `grad_avg.mul_(mom).add_(g, alpha=1-mom)` is two
kernel launches for the whole bucket, not two per parameter (compiled, large tensors
are written one by one instead: see `_foreach`).

Scalars that a block multiplies by come in three kinds, and every method accepts all of them:

* a Python number (the common case: a hyperparameter);
* a 0-d tensor (a hyperparameter on the compiled path, or a tensor `lr`), one value for all;
* a `TensorList` of 0-d tensors, one value per tensor (a per-layer norm or trust ratio).

Per-tensor reductions (`norm`, `rms`, `sum`) return the third kind, which broadcasts back.

This module is the arithmetic and nothing else: while a chain is traced for inductor, operations
are written the way `compiler_hints` says (`_foreach`), and the norms of FSDP2's sharded tensors
come from `distributed`.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, Iterable, Sequence

import torch

from . import compiler_hints as hints
from .distributed import distribution_of, sharded_norms

Scalar = "float | int | torch.Tensor | TensorList"


def _is_number(x) -> bool:
    """A Python scalar in arithmetic (a bool counts as 0 or 1)."""
    return isinstance(x, (int, float, bool)) and not isinstance(x, torch.Tensor)


def compiling() -> bool:
    """Whether the code running is being traced for a compiler (see `compiler_hints`)."""
    return hints.compiling()


def _foreach(name: str, tensors: list, *args, **kwargs):
    """`torch._foreach_<name>(tensors, *args, **kwargs)`; while traced for inductor, written as
    `compiler_hints.foreach` says (tensor by tensor for large tensors).  Eagerly, one foreach call
    beats a Python loop."""
    if hints.compiling():
        return hints.foreach(name, tensors, *args, **kwargs)
    return getattr(torch, f"_foreach_{name}")(tensors, *args, **kwargs)


def _unwrap(x):
    return x.tensors if isinstance(x, TensorList) else x


class TensorList:
    """A list of tensors whose arithmetic runs over all of them at once."""

    __slots__ = ("tensors",)

    def __init__(self, tensors: Iterable[torch.Tensor]):
        # The methods below pass lists, not generator expressions: dynamo (the compiled path)
        # cannot resume after a graph break once it has traced a generator (torch 2.13).
        self.tensors = list(tensors)

    # ---- container protocol -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self):
        return iter(self.tensors)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return type(self)(self.tensors[i]) if type(self) is TensorList else TensorList(self.tensors[i])
        return self.tensors[i]

    def __repr__(self) -> str:
        return f"TensorList({self.tensors!r})"

    def map(self, fn: Callable, *others) -> "TensorList":
        """Apply `fn` tensor by tensor: the fallback for operations torch has no foreach for."""
        cols = [_per_tensor(o, len(self)) for o in others]
        return TensorList([fn(t, *[c[i] for c in cols]) for i, t in enumerate(self.tensors)])

    def elementwise(self, fn: Callable, *others) -> "TensorList":
        """`map` for an elementwise `fn` (a comparison, `where`).  Where the tensors are values
        per tensor (0-d: norms, trust ratios) they are stacked into one vector, eagerly, and `fn`
        runs once: a few kernels instead of one per tensor (on a GPU each kernel is a launch, and
        LAMB's trust ratio made about 600 of them per step on GPT-2 small)."""
        stacked = _stacked(self.tensors, others)
        if stacked is None:
            return self.map(fn, *others)
        return TensorList(list(fn(*stacked).unbind()))

    # ---- construction ---------------------------------------------------------------------
    def zeros_like(self, dtype=None) -> "TensorList":
        return TensorList([torch.zeros_like(t, dtype=dtype, memory_format=torch.preserve_format)
                           for t in self.tensors])

    def clone(self) -> "TensorList":
        return TensorList([t.clone(memory_format=torch.preserve_format) for t in self.tensors])

    def to(self, *args, **kwargs) -> "TensorList":
        return TensorList([t.to(*args, **kwargs) for t in self.tensors])

    # ---- out-of-place arithmetic ------------------------------------------------------------
    def add(self, other, alpha=1) -> "TensorList":
        return self.clone().add_(other, alpha=alpha) if _needs_scaling(alpha) else \
            TensorList(_foreach_binary("add", self.tensors, other, alpha))

    def sub(self, other, alpha=1) -> "TensorList":
        return self.add(other, alpha=-alpha if _is_number(alpha) else neg(alpha))

    def mul(self, other) -> "TensorList":
        return TensorList(_foreach_binary("mul", self.tensors, other))

    def div(self, other) -> "TensorList":
        return TensorList(_foreach_binary("div", self.tensors, other))

    def pow(self, exponent) -> "TensorList":
        if _is_number(exponent) and exponent == 2:
            return self.mul(self)
        return TensorList(_foreach("pow", self.tensors, _unwrap(exponent)))

    def sqrt(self) -> "TensorList":
        return TensorList(_foreach("sqrt", self.tensors))

    def abs(self) -> "TensorList":
        return TensorList(_foreach("abs", self.tensors))

    def neg(self) -> "TensorList":
        return TensorList(_foreach("neg", self.tensors))

    def sign(self) -> "TensorList":
        return TensorList(_foreach("sign", self.tensors))

    def exp(self) -> "TensorList":
        return TensorList(_foreach("exp", self.tensors))

    def log(self) -> "TensorList":
        return TensorList(_foreach("log", self.tensors))

    def reciprocal(self) -> "TensorList":
        return TensorList(_foreach("reciprocal", self.tensors))

    def maximum(self, other) -> "TensorList":
        return TensorList(_foreach_binary("maximum", self.tensors, other))

    def minimum(self, other) -> "TensorList":
        return TensorList(_foreach_binary("minimum", self.tensors, other))

    def clamp_min(self, value) -> "TensorList":
        return TensorList(_foreach_binary("clamp_min", self.tensors, value))

    def clamp_max(self, value) -> "TensorList":
        return TensorList(_foreach_binary("clamp_max", self.tensors, value))

    def addcmul(self, t1, t2, value=1) -> "TensorList":
        return self.clone().addcmul_(t1, t2, value=value)

    def addcdiv(self, t1, t2, value=1) -> "TensorList":
        return self.clone().addcdiv_(t1, t2, value=value)

    def lerp(self, end, weight) -> "TensorList":
        return self.clone().lerp_(end, weight)

    def where(self, condition, other) -> "TensorList":
        """`self` where `condition` holds, else `other` (tensor by tensor, broadcasting)."""
        if isinstance(condition, bool):
            if condition:
                return self
            return other if isinstance(other, TensorList) else \
                self.elementwise(lambda t: torch.full_like(t, other))
        return self.elementwise(lambda t, c, o: torch.where(c, t, o), condition, other)

    # ---- in-place arithmetic -----------------------------------------------------------------
    def add_(self, other, alpha=1) -> "TensorList":
        if _needs_scaling(alpha):
            other, alpha = _scaled(other, alpha), 1
        _foreach_binary("add", self.tensors, other, alpha, inplace=True)
        return self

    def sub_(self, other, alpha=1) -> "TensorList":
        return self.add_(other, alpha=-alpha if _is_number(alpha) else neg(alpha))

    def mul_(self, other) -> "TensorList":
        _foreach_binary("mul", self.tensors, other, inplace=True)
        return self

    def div_(self, other) -> "TensorList":
        _foreach_binary("div", self.tensors, other, inplace=True)
        return self

    def sqrt_(self) -> "TensorList":
        _foreach("sqrt_", self.tensors)
        return self

    def abs_(self) -> "TensorList":
        _foreach("abs_", self.tensors)
        return self

    def neg_(self) -> "TensorList":
        _foreach("neg_", self.tensors)
        return self

    def reciprocal_(self) -> "TensorList":
        _foreach("reciprocal_", self.tensors)
        return self

    def maximum_(self, other) -> "TensorList":
        _foreach_binary("maximum", self.tensors, other, inplace=True)
        return self

    def clamp_min_(self, value) -> "TensorList":
        _foreach_binary("clamp_min", self.tensors, value, inplace=True)
        return self

    def clamp_max_(self, value) -> "TensorList":
        _foreach_binary("clamp_max", self.tensors, value, inplace=True)
        return self

    def addcmul_(self, t1, t2, value=1) -> "TensorList":
        """self += value * t1 * t2."""
        t1, t2 = _as_list(t1, len(self)), _as_list(t2, len(self))
        if _needs_scaling(value):
            t1, value = _unwrap(TensorList(t1).mul(value)), 1
        _foreach("addcmul_", self.tensors, t1, t2, value=value)
        return self

    def addcdiv_(self, t1, t2, value=1) -> "TensorList":
        """self += value * t1 / t2."""
        t1, t2 = _as_list(t1, len(self)), _as_list(t2, len(self))
        if _needs_scaling(value):
            t1, value = _unwrap(TensorList(t1).mul(value)), 1
        _foreach("addcdiv_", self.tensors, t1, t2, value=value)
        return self

    def lerp_(self, end, weight) -> "TensorList":
        """self += weight * (end - self)."""
        end = _as_list(end, len(self))
        if isinstance(weight, TensorList):
            return self.add_(TensorList(end).sub(self).mul(weight))
        if isinstance(weight, torch.Tensor):
            # torch.compile's decomposition of the 0-d-tensor overload goes wrong on 0-d tensors
            # (torch 2.13): the per-tensor list overload gives the right numbers.
            weight = [weight] * len(self)
        _foreach("lerp_", self.tensors, end, weight)
        return self

    def copy_(self, src) -> "TensorList":
        src = _as_list(src, len(self))
        try:
            _foreach("copy_", self.tensors, src)
        except NotImplementedError:
            # DTensor (FSDP2's sharded parameters) has no sharding rule for foreach copy.
            for t, s in zip(self.tensors, src):
                t.copy_(s)
        return self

    def zero_(self) -> "TensorList":
        _foreach("zero_", self.tensors)
        return self

    # ---- per-tensor reductions: a TensorList of 0-d tensors ---------------------------------
    def norm(self, ord=2) -> "TensorList":
        """The norm of each tensor; of each whole tensor for DTensors (FSDP2's shards), with one
        collective for the list rather than one or more per tensor."""
        if not self.tensors:
            return TensorList([])
        if distribution_of(self.tensors[0]) is not None:
            norms = sharded_norms(self.tensors, ord)
            if norms is not None:
                return TensorList(norms)
        return TensorList(_foreach("norm", self.tensors, ord))

    def numel(self) -> list[int]:
        return [t.numel() for t in self.tensors]

    def rms(self) -> "TensorList":
        """Root mean square of each tensor: `t.pow(2).mean().sqrt()`, 0 for an empty tensor."""
        norms, sizes = self.norm(), [math.sqrt(max(n, 1)) for n in self.numel()]
        if hints.norms_are_flat() and hints.compiling_for_cpu(self.tensors):
            # Tensor by tensor: inductor does not lower a foreach division by a list of numbers,
            # and such a call between two loops keeps them apart.
            return TensorList([n / size for n, size in zip(norms.tensors, sizes)])
        return norms.div(sizes)

    def channel_mean(self) -> "TensorList":
        """The mean of each output channel (over every dimension but the first), shaped
        `(out, 1, ..., 1)`."""
        means = self.map(lambda t: t.mean(dim=_channel_dims(t), keepdim=True))
        hints.after_channel_reduction()
        return means

    def channel_rms(self) -> "TensorList":
        """The RMS of each output channel, shaped `(out, 1, ..., 1)`."""
        def rms(t):
            norm = torch.linalg.vector_norm(t, dim=_channel_dims(t), keepdim=True)
            return norm.div_(math.sqrt(max(math.prod(t.shape[1:]), 1)))
        found = self.map(rms)
        hints.after_channel_reduction()
        return found

    def log1pexp(self, nonnegative: bool = False) -> "TensorList":
        """`log(1 + exp(x))` per element (the softplus with its scale taken out:
        `softplus(x, b) = log1pexp(b x) / b`), eagerly written over `self`, a temporary of the
        caller's (torch's softplus kernel, linear above 20 as torch's `Softplus` is).
        `nonnegative=True` says every element is >= 0 (a root, a magnitude): the compiled form
        may then be cheaper (see `compiler_hints.log1p_exp`)."""
        if hints.compiling():
            return self.map(lambda t: hints.log1p_exp(t, nonnegative))
        for t in self.tensors:
            torch.ops.aten.softplus.out(t, 1.0, 20.0, out=t)
        return self

    def sum(self) -> "TensorList":
        return TensorList([t.sum() for t in self.tensors])

    def mean(self) -> "TensorList":
        return TensorList([t.mean() for t in self.tensors])

    # ---- operators -----------------------------------------------------------------------------
    __add__ = add
    __mul__ = mul
    __truediv__ = div
    __pow__ = pow
    __neg__ = neg

    def __sub__(self, other):
        return self.sub(other)

    def __radd__(self, other):
        return self.add(other)

    def __rmul__(self, other):
        return self.mul(other)

    def __rsub__(self, other):
        return self.neg().add_(other)

    def __rtruediv__(self, other):
        return self.reciprocal().mul_(other)

    def __gt__(self, other):
        return self.elementwise(torch.gt, other)

    def __ge__(self, other):
        return self.elementwise(torch.ge, other)

    def __lt__(self, other):
        return self.elementwise(torch.lt, other)

    def __le__(self, other):
        return self.elementwise(torch.le, other)

    def __eq__(self, other):  # elementwise, as for tensors
        return self.elementwise(torch.eq, other)

    __hash__ = None

    def __or__(self, other):
        return self.elementwise(torch.logical_or, other)

    def __and__(self, other):
        return self.elementwise(torch.logical_and, other)

    def __invert__(self):
        return self.elementwise(torch.logical_not)


class ParamList(TensorList):
    """The parameters of a bucket, with their gradients as `.grad` (a `TensorList`).

    A block may replace `.grad` (L2 regularisation adds `wd * p` to it) without touching the
    tensors in the parameters' own `.grad`: the change is seen by the blocks after it only.
    """

    __slots__ = ("grad",)

    def __init__(self, params: Iterable[torch.Tensor], grads: Iterable[torch.Tensor] | None = None):
        super().__init__(params)
        self.grad = TensorList(grads if grads is not None else [p.grad for p in self.tensors])

    @property
    def data(self) -> "ParamList":
        return self

    def norm(self, ord=2) -> TensorList:
        if hints.compiling():
            return TensorList(hints.read_with_grad(self.tensors, self.grad.tensors)).norm(ord)
        return super().norm(ord)


def _channel_dims(t: torch.Tensor) -> tuple:
    if t.ndim < 2:
        raise ValueError(f"a per-output-channel statistic needs a tensor of 2 or more dimensions, "
                         f"got shape {tuple(t.shape)}: check the predicate")
    return tuple(range(1, t.ndim))


# ---- helpers for the three kinds of scalar ------------------------------------------------------

def _needs_scaling(alpha) -> bool:
    """foreach's `alpha`/`value` must be a Python number; anything else is multiplied in."""
    return not _is_number(alpha)


def _scaled(other, alpha):
    if _is_number(other):
        return mul(other, alpha)
    return TensorList(_as_list(other, None)).mul(alpha)


def _as_list(x, n):
    if isinstance(x, TensorList):
        return x.tensors
    if isinstance(x, (list, tuple)):
        return list(x)
    raise TypeError(f"expected a TensorList, got {type(x).__name__}")


def _stacked(tensors: list, others: tuple) -> list | None:
    """`tensors` and each of `others` as one vector (a list of 0-d tensors stacked; a single value
    kept, to broadcast), or None where that does not apply: under compile (inductor fuses the
    per-tensor form), for one tensor, for tensors that are not all 0-d on one device and dtype."""
    if hints.compiling() or len(tensors) < 2:
        return None
    out = []
    for column in (tensors, *others):
        if isinstance(column, (TensorList, list, tuple)):
            column = list(_unwrap(column))
            first = column[0] if len(column) == len(tensors) else None
            if first is None or not all(
                    isinstance(t, torch.Tensor) and t.dim() == 0 and t.device == first.device
                    and t.dtype == first.dtype for t in column):
                return None
            out.append(torch.stack(column))
        elif _is_number(column) or (isinstance(column, torch.Tensor) and column.dim() == 0):
            out.append(column)
        else:
            return None
    return out


def _per_tensor(x, n):
    """`x` as one value per tensor: a TensorList/list stays, a single value is repeated."""
    if isinstance(x, TensorList):
        return x.tensors
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x] * n


#: With one scalar for all tensors these are torch's clamp kernels (DTensor knows only the latter).
_SCALAR_FORMS = {"maximum": "clamp_min", "minimum": "clamp_max"}


def _foreach_binary(op: str, tensors: list, other, alpha=1, inplace=False):
    if isinstance(other, TensorList):
        other = other.tensors
    if op in _SCALAR_FORMS and not isinstance(other, list):
        op = _SCALAR_FORMS[op]
    fn = partial(_foreach, f"{op}_" if inplace else op)
    if op in ("add", "sub") and alpha != 1:
        if isinstance(other, list):
            return fn(tensors, other, alpha=alpha)
        other = other * alpha
    if isinstance(other, torch.Tensor) and other.dim() > 0:
        raise ValueError("a scalar operand must be a number, a 0-d tensor or a TensorList")
    if isinstance(other, torch.Tensor) and op not in ("mul", "div"):
        # Only mul and div have a 0-d-tensor overload that torch.compile traces without reading
        # the value (.item() breaks the graph); a list of the same 0-d tensor broadcasts alike.
        other = [other] * len(tensors)
    if isinstance(other, bool):
        other = float(other)
    return fn(tensors, other)


# ---- scalar functions: Python numbers stay Python numbers, tensors stay tensors ---------------

def is_tensorish(x) -> bool:
    return isinstance(x, (torch.Tensor, TensorList))


def sqrt(x):
    if isinstance(x, TensorList):
        return x.sqrt()
    if isinstance(x, torch.Tensor):
        return x.sqrt()
    return math.sqrt(x)


def neg(x):
    return -x


def mul(a, b):
    if isinstance(b, TensorList) and not isinstance(a, TensorList):
        return b.mul(a)
    return a * b


def minimum(a, b):
    """Elementwise minimum of numbers, 0-d tensors or TensorLists.  A tensor and a number give a
    tensor of the tensor's dtype (the number never becomes a float32 tensor first)."""
    return _extremum(a, b, "minimum", torch.minimum, "clamp_max", min)


def maximum(a, b):
    """Elementwise maximum, as `minimum`."""
    return _extremum(a, b, "maximum", torch.maximum, "clamp_min", max)


def _extremum(a, b, method: str, of_tensors, clamp: str, of_numbers):
    """`minimum` or `maximum`: the TensorList's `method`, `of_tensors` for two tensors, a
    tensor's `clamp` by a number, `of_numbers` for two numbers."""
    if isinstance(a, TensorList):
        return getattr(a, method)(b)
    if isinstance(b, TensorList):
        return getattr(b, method)(a)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return of_tensors(a, b)
    if isinstance(a, torch.Tensor):
        return getattr(a, clamp)(b)
    if isinstance(b, torch.Tensor):
        return getattr(b, clamp)(a)
    return of_numbers(a, b)


def where(condition, a, b):
    """`a` where `condition` holds, else `b`.

    With a Python bool this is a plain choice; with a tensor condition (a per-tensor test, or any
    test under `torch.compile`) both sides are computed and selected elementwise, so no Python
    branch depends on tensor data.
    """
    if isinstance(condition, bool):
        return a if condition else b
    if isinstance(condition, TensorList):
        if isinstance(a, TensorList):
            return a.where(condition, b)
        # Numbers go to torch.where as they are: a tensor made of one on a GPU is a copy from
        # the host, which waits for the device.
        return condition.elementwise(torch.where, a, b)
    if isinstance(a, TensorList):
        return a.where(condition, b)
    if isinstance(b, TensorList):
        return b.where(~condition if isinstance(condition, torch.Tensor) else not condition, a)
    return torch.where(condition, torch.as_tensor(a), torch.as_tensor(b))


def as_tensorlist(x: torch.Tensor | Sequence[torch.Tensor] | TensorList) -> TensorList:
    if isinstance(x, TensorList):
        return x
    if isinstance(x, torch.Tensor):
        return TensorList([x])
    return TensorList(x)
