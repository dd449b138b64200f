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
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from functools import partial
from typing import Callable, Iterable, Sequence

import torch

Scalar = "float | int | torch.Tensor | TensorList"


#: While the compiled path traces a chain (`tracing`): the places where the graph is to be cut.
_TRACING: contextvars.ContextVar[list | None] = contextvars.ContextVar("optcraft_tracing",
                                                                      default=None)


def compiling() -> bool:
    """Whether the code running is being traced for a compiler: by dynamo (`torch.compile` of a
    user's function) or by the compiled path's own tracer (`tracing`).  Blocks and this module ask
    this, never `torch.compiler.is_compiling()` alone, to choose their compiled forms."""
    # dynamo's test first: dynamo cannot trace `ContextVar.get`.
    return torch.compiler.is_compiling() or _TRACING.get() is not None


@contextlib.contextmanager
def tracing():
    """Within it, `compiling()` is true, and `end_graph()` records where it was called (the last
    node of the graph traced so far) in the list this yields: `optcraft.compiled` traces a chain
    so, with `make_fx`, which `torch.compiler.is_compiling()` does not see."""
    cuts: list = []
    token = _TRACING.set(cuts)
    try:
        yield cuts
    finally:
        _TRACING.reset(token)


def end_graph() -> None:
    """End the graph being traced here: what follows is compiled as a graph of its own (under the
    compiled path's tracer: it splits its graph there; under dynamo: a graph break).  Nothing
    eagerly.  Blocks call it where one graph compiles badly or fails, saying why."""
    if torch.compiler.is_compiling():
        torch._dynamo.graph_break()
        return
    cuts = _TRACING.get()
    if cuts is not None:
        from torch.fx.experimental.proxy_tensor import get_proxy_mode

        cuts.append(next(reversed(get_proxy_mode().tracer.graph.nodes)))


def _is_number(x) -> bool:
    return isinstance(x, (int, float, bool)) and not isinstance(x, torch.Tensor)


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
    def norm(self, ord=2, flat=False) -> "TensorList":
        """The norm of each tensor; of each whole tensor for DTensors (FSDP2's shards), with one
        collective for the list rather than one or more per tensor.

        Compiled for a CPU, each norm is taken over rows (`_blocked_norm`), or with `flat=True`
        as one reduction over the whole tensor: inductor's C++ code writes an elementwise result
        in a reduction's loop only when both run over the same range, and it merges a contiguous
        tensor's dimensions for elementwise work, so a norm over rows gets a loop of its own (see
        `stored`)."""
        if not self.tensors:
            return TensorList([])
        if distribution_of(self.tensors[0]) is not None:
            norms = _sharded_norms(self.tensors, ord)
            if norms is not None:
                return TensorList(norms)
        if flat and _compiling_for_cpu(self.tensors):
            return TensorList([torch.linalg.vector_norm(t, ord) for t in self.tensors])
        return TensorList(_foreach("norm", self.tensors, ord))

    def numel(self) -> list[int]:
        return [t.numel() for t in self.tensors]

    def rms(self, flat=False) -> "TensorList":
        """Root mean square of each tensor: `t.pow(2).mean().sqrt()`, 0 for an empty tensor."""
        norms, sizes = self.norm(flat=flat), [math.sqrt(max(n, 1)) for n in self.numel()]
        if flat and _compiling_for_cpu(self.tensors):
            # Tensor by tensor: inductor does not lower a foreach division by a list of numbers,
            # and such a call between two loops keeps them apart.
            return TensorList([n / size for n, size in zip(norms.tensors, sizes)])
        return norms.div(sizes)

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
    if compiling() or len(tensors) < 2:
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


#: Compiled (`compiling()`), tensors of at least this many elements are computed tensor by tensor;
#: smaller ones stay in foreach calls (see `_foreach`).  The compiled path compiles only such
#: tensors and runs smaller ones eagerly (`optcraft.compiled.split_bucket`).
PER_TENSOR_MIN_NUMEL = 1 << 16


def _foreach(name: str, tensors: list, *args, **kwargs):
    """`torch._foreach_<name>(tensors, *args, **kwargs)`; compiled (`compiling()`), the same
    operation tensor by tensor (`t.<name>(...)`, list arguments taken element by element) for the
    tensors of `PER_TENSOR_MIN_NUMEL` elements or more.

    Why: inductor (torch 2.13, CPU) turns each foreach call into its own pass over memory, while
    per-tensor operations fuse into one loop per tensor: on GPT-2 small a compiled Adam step is
    about 4x faster written per tensor.  Small tensors (when a user compiles a whole step that
    holds them) stay in foreach calls: their extra passes stay in cache, and thousands of
    per-tensor operations would make compiling take minutes.  Eagerly, one foreach call beats a
    Python loop."""
    foreach = getattr(torch, f"_foreach_{name}")
    if not compiling():
        return foreach(tensors, *args, **kwargs)
    args = tuple([_realized(a) for a in args])  # a list: see TensorList.__init__
    # 0-d tensors stay in the foreach call whatever the threshold: torch 2.13 takes a 0-d float64
    # graph input as a Python number, and an in-place write to it tensor by tensor is dropped.
    big = [i for i, t in enumerate(tensors) if t.numel() >= PER_TENSOR_MIN_NUMEL and t.dim() > 0]
    if not big:
        return foreach(tensors, *args, **kwargs)
    chosen = set(big)
    small = [i for i in range(len(tensors)) if i not in chosen]
    is_list = [isinstance(a, (list, tuple)) for a in args]
    results: list = [None] * len(tensors)
    if small:
        picked = [[a[i] for i in small] if listed else a for a, listed in zip(args, is_list)]
        out = foreach([tensors[i] for i in small], *picked, **kwargs)
        for i, r in zip(small, out or [None] * len(small)):
            results[i] = r
    if name == "norm":
        for i in big:
            results[i] = _blocked_norm(tensors[i], *args, **kwargs)
        return results
    for i in big:
        picked = [a[i] if listed else a for a, listed in zip(args, is_list)]
        if name in _NO_TENSOR_METHOD:  # in place, as the foreach call is
            tensors[i].copy_(getattr(torch, name[:-1])(tensors[i], *picked, **kwargs))
        else:
            results[i] = getattr(tensors[i], name)(*picked, **kwargs)
    return None if name.endswith("_") else results


#: In-place foreach operations that `torch.Tensor` has no method for.
_NO_TENSOR_METHOD = frozenset({"maximum_", "minimum_"})


#: `_blocked_norm` sums rows of at most this many elements first: inductor sums a row this short
#: in registers, where a longer reduction goes through its cascade-summation helper.
NORM_ROW = 4096


def _row_length(numel: int) -> int | None:
    """The longest row of at most `NORM_ROW` (and at least an eighth of it) elements that divides
    `numel`: the whole tensor is then a plain view, so inductor need not materialise it."""
    for row in range(NORM_ROW, NORM_ROW // 8 - 1, -1):
        if numel % row == 0:
            return row
    return None


def _blocked_norm(t: torch.Tensor, ord=2) -> torch.Tensor:
    """`torch.linalg.vector_norm(t, ord)` for a large tensor when compiled, as the norm of
    the norms of its rows (a view of it as rows of `_row_length` elements): the same value for any
    `ord > 0`, since a sum of powers (or a max) can be regrouped.

    Why: inductor's C++ code sums a long reduction with a cascade helper whose running sum goes
    through memory every iteration, and that chain, not memory, then bounds the loop; a row of a
    few thousand elements is summed in registers.  Measured here: a norm pass over four tensors of
    38M elements 1.6x faster, the norm pass of LAMB's step on GPT-2 small about 15% faster."""
    row = _row_length(t.numel()) if t.is_contiguous() else None
    if row is None or not isinstance(ord, (int, float)) or ord <= 0:
        return torch.linalg.vector_norm(t, ord)
    rows = torch.linalg.vector_norm(t.view(-1, row), ord, dim=1)
    return torch.linalg.vector_norm(rows, ord)


def _compiling_for_cpu(tensors: list) -> bool:
    return compiling() and bool(tensors) and tensors[0].device.type == "cpu"


def _materialised(t: torch.Tensor) -> torch.Tensor:
    """`t` as an identity `as_strided` view: under `torch.compile`, `as_strided` is one of the
    operations whose input inductor always materialises as a buffer (used by `stored` and
    `_realized`)."""
    return torch.as_strided(t, t.shape, t.stride())


def stored(t: TensorList) -> TensorList:
    """`t`; compiled for a CPU, `t` as written back to its own memory (for a `ParamList`, the
    parameters so, with their gradients).

    Why: inductor computes a tensor that the graph updates in place wherever it is read, and
    writes it back in a loop of its own.  Read through `_materialised`, the new values are written
    once, in the first loop that reads them, and that can be a reduction's loop: LAMB's trust
    ratio then writes the moments in the loop that sums its norms (see
    `blocks.layerwise.lamb_trust_ratio`).  Only where nothing later in the graph
    reads the values: inductor would then keep them in a temporary."""
    if not _compiling_for_cpu(t.tensors):
        return t
    values = [_materialised(x) for x in t.tensors]
    return ParamList(values, t.grad) if isinstance(t, ParamList) else TensorList(values)


def read_with_grad(p: "ParamList") -> TensorList:
    """The parameters' values; compiled, as `where(g == g, p, p)`, the same values
    read together with the gradient, so that a norm of them shares an input with a norm of the
    gradient or of an update made from it (LARC, LARS, LAMB, PreLAMB).

    Why: inductor's C++ code sums reductions over the same rows in one loop only when they share
    an input.  A parameter norm would otherwise be a loop of its own over p alone, and one stream
    read at a time is the slowest pass on a CPU (about 20 GB/s here, where a loop reading four
    tensors reads 26): with it, both norms come from one loop (LAMB's compiled step on GPT-2
    small about 3% faster, interleaved A/B)."""
    if not compiling():
        return p
    return p.map(lambda t, g: torch.where(g == g, t, t), p.grad)


def _realized(arg):
    """Compiled, a 0-d tensor operand (or a list of them) computed in the graph, made
    a buffer of its own before the loops that use it.

    Why: inductor's C++ code otherwise recomputes a scalar expression (Adam's `1 - mom**step`, a
    layer's trust ratio from its norms) inside every iteration of the elementwise loop, and the
    compiler cannot lift it out when the loop also stores through pointers that might alias its
    inputs.  Realising them took LAMB's compiled step on GPT-2 small from about 150 to 108 ms."""
    if isinstance(arg, torch.Tensor):
        return _materialised(arg) if arg.dim() == 0 else arg
    if isinstance(arg, list) and any(isinstance(a, torch.Tensor) and a.dim() == 0 for a in arg):
        return [_realized(a) for a in arg]
    return arg


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

def distribution_of(t: torch.Tensor):
    """How a DTensor (FSDP2's sharded parameter) is laid out, `(mesh, placements)`, or None for a
    plain tensor: tensors laid out differently cannot share one foreach call."""
    mesh = getattr(t, "device_mesh", None)
    return None if mesh is None else (mesh, tuple(t.placements))


def _sharded_norms(tensors: list, ord) -> list | None:
    """The norms of whole DTensors, from the norms of the local shards: each rank computes its
    shards' norms in one foreach call, one all-reduce per sharded mesh dimension combines them
    for the whole list, and the results are replicated 0-d DTensors.

    torch's own `_foreach_norm` on DTensors is right too, but leaves each norm pending
    (a partial placement) and reduces it anew, one collective per tensor, wherever it is used:
    LARC's step would make three per parameter.  None where this does not apply: tensors laid out
    differently, a partial placement (its local values are not the tensor's), or an `ord` without
    such a combination."""
    from torch.distributed import _functional_collectives as collectives
    from torch.distributed.tensor import DTensor, Replicate

    layout = distribution_of(tensors[0])
    mesh, placements = layout
    if any(not (pl.is_shard() or pl.is_replicate()) for pl in placements) or \
            any(distribution_of(t) != layout for t in tensors[1:]):
        return None
    ord = float(ord)
    if ord == math.inf:
        reduce_op, power = "max", None
    elif ord == -math.inf:
        reduce_op, power = "min", None
    elif ord > 0:
        reduce_op, power = "sum", ord
    else:
        return None
    shards = [t.to_local() for t in tensors]
    if power is None and any(t.numel() == 0 for t in shards):
        # torch has no max/min norm of an empty tensor; an empty shard takes no part in the max
        # (norms are >= 0) or in the min.
        filled = [i for i, t in enumerate(shards) if t.numel()]
        local = torch.full((len(shards),), 0.0 if ord > 0 else math.inf,
                           dtype=shards[0].real.dtype, device=shards[0].device)
        if filled:
            local[filled] = torch.stack(torch._foreach_norm([shards[i] for i in filled], ord))
    else:
        local = torch.stack(torch._foreach_norm(shards, ord))
    if power is not None:
        local = local.pow(power)
    for dim, placement in enumerate(placements):
        if placement.is_shard():
            local = collectives.all_reduce(local, reduce_op, (mesh, dim))
    if power == 2:
        local = local.sqrt()
    elif power is not None:
        local = local.pow(1 / power)
    replicated = [Replicate()] * mesh.ndim
    return [DTensor.from_local(n, mesh, replicated, run_check=False) for n in local.unbind(0)]


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
    """Elementwise minimum of numbers, 0-d tensors or TensorLists."""
    if isinstance(a, TensorList):
        return a.minimum(b)
    if isinstance(b, TensorList):
        return b.minimum(a)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.minimum(torch.as_tensor(a), torch.as_tensor(b))
    return min(a, b)


def maximum(a, b):
    if isinstance(a, TensorList):
        return a.maximum(b)
    if isinstance(b, TensorList):
        return b.maximum(a)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.maximum(torch.as_tensor(a), torch.as_tensor(b))
    return max(a, b)


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
