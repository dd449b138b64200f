"""Compiler hints: how `TensorList` arithmetic is written while it is being traced for inductor.

Nothing here changes a number; each function gives the same values as its eager form, written so
that inductor's C++ code (torch 2.13, CPU) generates faster or working loops.  `tensorlist` calls
these when `compiling()` is true; blocks never do (an algorithm knows no execution path).

* `foreach`: a `torch._foreach_*` call written tensor by tensor for large tensors: inductor gives
  each foreach call its own pass over memory, but fuses a tensor's operations into one loop.
* `realized`: 0-d operands computed in the graph made buffers of their own, so the elementwise
  loop does not recompute them in every iteration.
* `blocked_norm`: a norm as the norm of its rows' norms (inductor's long reductions are bound by
  their summation helper, not memory); `flat_norms` asks for one reduction instead.
* `read_with_grad`: the parameters read together with the gradient, so that their norm and the
  gradient's share one loop.
* `log1p_exp`: the softplus without inductor's threshold, and its logarithm a polynomial.
* `after_channel_reduction`: the graph ends after a per-channel reduction (torch 2.13's CPU code
  generation fails on one graph that holds it and the elementwise code using it).

Under a user's `torch.compile` (dynamo), an optimizer step is one operation of the user's graph,
`optcraft::step` (`step_as_one_operation`): dynamo does not trace the step's bookkeeping, which
is host Python over dicts; the operation runs the step as it runs eagerly, on the optimizer's path
(`impl="compiled"` compiles its arithmetic).
"""
from __future__ import annotations

import contextlib
import contextvars
import weakref
from typing import Optional

import torch

#: While the compiled path traces a chain (`tracing`): the places where the graph is to be cut.
_TRACING: contextvars.ContextVar[list | None] = contextvars.ContextVar("optcraft_tracing",
                                                                      default=None)
#: Inside `flat_norms()`: norms are one reduction over the whole tensor.
_FLAT_NORMS: contextvars.ContextVar[bool] = contextvars.ContextVar("optcraft_flat_norms",
                                                                   default=False)


def compiling() -> bool:
    """Whether the code running is being traced for a compiler: by dynamo (`torch.compile` of a
    user's function) or by the compiled path's own tracer (`tracing`)."""
    # dynamo's test first: dynamo cannot trace `ContextVar.get`.
    return torch.compiler.is_compiling() or _TRACING.get() is not None


def compiling_for_cpu(tensors) -> bool:
    return compiling() and bool(tensors) and tensors[0].device.type == "cpu"


@contextlib.contextmanager
def tracing():
    """Within it, `compiling()` is true, and `end_graph()` records where it was called (the last
    node of the graph traced so far) in the list this yields: the compiled path traces a chain
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
    eagerly."""
    if torch.compiler.is_compiling():
        torch._dynamo.graph_break()
        return
    cuts = _TRACING.get()
    if cuts is not None:
        from torch.fx.experimental.proxy_tensor import get_proxy_mode

        cuts.append(next(reversed(get_proxy_mode().tracer.graph.nodes)))


def after_channel_reduction() -> None:
    """Compiled, end the graph after a per-output-channel reduction: torch 2.13's CPU code
    generation fails (KeyError 'buf..' in its outer-loop fusion) on one graph holding such a
    reduction and the elementwise code that uses it."""
    if compiling():
        end_graph()


@contextlib.contextmanager
def flat_norms():
    """Within it, compiled norms are one reduction over the whole tensor rather than over rows
    (`blocked_norm`): inductor's C++ code writes an elementwise result in a reduction's loop only
    when both run over the same range, and it merges a contiguous tensor's dimensions for
    elementwise work, so a norm over rows gets a loop of its own."""
    token = _FLAT_NORMS.set(True)
    try:
        yield
    finally:
        _FLAT_NORMS.reset(token)


def norms_are_flat() -> bool:
    return _FLAT_NORMS.get()


#: Compiled, tensors of at least this many elements are computed tensor by tensor; smaller ones
#: stay in foreach calls (see `foreach`).  The compiled path compiles only such tensors and runs
#: smaller ones eagerly.
PER_TENSOR_MIN_NUMEL = 1 << 16

#: In-place foreach operations that `torch.Tensor` has no method for.
_NO_TENSOR_METHOD = frozenset({"maximum_", "minimum_"})


def foreach(name: str, tensors: list, *args, **kwargs):
    """`torch._foreach_<name>(tensors, *args, **kwargs)` written tensor by tensor (`t.<name>(...)`,
    list arguments taken element by element) for the tensors of `PER_TENSOR_MIN_NUMEL` elements
    or more.

    Why: inductor (torch 2.13, CPU) turns each foreach call into its own pass over memory, while
    per-tensor operations fuse into one loop per tensor: on GPT-2 small a compiled Adam step is
    about 4x faster written per tensor.  Small tensors stay in foreach calls: their extra passes
    stay in cache, and thousands of per-tensor operations would make compiling take minutes."""
    op = getattr(torch, f"_foreach_{name}")
    args = tuple([realized(a) for a in args])
    # 0-d tensors stay in the foreach call whatever the threshold: torch 2.13 takes a 0-d float64
    # graph input as a Python number, and an in-place write to it tensor by tensor is dropped.
    big = [i for i, t in enumerate(tensors) if t.numel() >= PER_TENSOR_MIN_NUMEL and t.dim() > 0]
    if not big:
        return op(tensors, *args, **kwargs)
    chosen = set(big)
    small = [i for i in range(len(tensors)) if i not in chosen]
    is_list = [isinstance(a, (list, tuple)) for a in args]
    results: list = [None] * len(tensors)
    if small:
        picked = [[a[i] for i in small] if listed else a for a, listed in zip(args, is_list)]
        out = op([tensors[i] for i in small], *picked, **kwargs)
        for i, r in zip(small, out or [None] * len(small)):
            results[i] = r
    if name == "norm":
        for i in big:
            results[i] = blocked_norm(tensors[i], *args, **kwargs)
        return results
    for i in big:
        picked = [a[i] if listed else a for a, listed in zip(args, is_list)]
        if name in _NO_TENSOR_METHOD:  # in place, as the foreach call is
            tensors[i].copy_(getattr(torch, name[:-1])(tensors[i], *picked, **kwargs))
        else:
            results[i] = getattr(tensors[i], name)(*picked, **kwargs)
    return None if name.endswith("_") else results


#: `blocked_norm` sums rows of at most this many elements first: inductor sums a row this short
#: in registers, where a longer reduction goes through its cascade-summation helper.
NORM_ROW = 4096


def _row_length(numel: int) -> int | None:
    """The longest row of at most `NORM_ROW` (and at least an eighth of it) elements that divides
    `numel`: the whole tensor is then a plain view, so inductor need not materialise it."""
    for row in range(NORM_ROW, NORM_ROW // 8 - 1, -1):
        if numel % row == 0:
            return row
    return None


def blocked_norm(t: torch.Tensor, ord=2) -> torch.Tensor:
    """`torch.linalg.vector_norm(t, ord)` as the norm of the norms of its rows (a view of it as
    rows of `_row_length` elements): the same value for any `ord > 0`, since a sum of powers (or a
    max) can be regrouped.  Inductor's C++ code sums a long reduction with a cascade helper whose
    running sum goes through memory every iteration, and that chain, not memory, then bounds the
    loop; a row of a few thousand elements is summed in registers."""
    row = _row_length(t.numel()) if t.is_contiguous() else None
    if norms_are_flat() or row is None or not isinstance(ord, (int, float)) or ord <= 0:
        return torch.linalg.vector_norm(t, ord)
    rows = torch.linalg.vector_norm(t.view(-1, row), ord, dim=1)
    return torch.linalg.vector_norm(rows, ord)


def materialised(t: torch.Tensor) -> torch.Tensor:
    """`t` as an identity `as_strided` view: `as_strided` is one of the operations whose input
    inductor always materialises as a buffer."""
    return torch.as_strided(t, t.shape, t.stride())


def realized(arg):
    """A 0-d tensor operand (or a list of them) computed in the graph, made a buffer of its own
    before the loops that use it: inductor's C++ code otherwise recomputes a scalar expression
    (Adam's `1 - mom**step`, a layer's trust ratio from its norms) inside every iteration of the
    elementwise loop, and the compiler cannot lift it out when the loop also stores through
    pointers that might alias its inputs."""
    if isinstance(arg, torch.Tensor):
        return materialised(arg) if arg.dim() == 0 else arg
    if isinstance(arg, list) and any(isinstance(a, torch.Tensor) and a.dim() == 0 for a in arg):
        return [realized(a) for a in arg]
    return arg


def read_with_grad(params: list, grads: list) -> list:
    """The parameters' values as `where(g == g, p, p)`: the same values, read together with the
    gradient, so that a norm of them shares an input with a norm of the gradient or of an update
    made from it (LARC, LARS, LAMB, PreLAMB).  Inductor's C++ code sums reductions over the same
    rows in one loop only when they share an input; a parameter norm would otherwise be a loop of
    its own over p alone, and one stream read at a time is the slowest pass on a CPU."""
    return [torch.where(g == g, t, t) for t, g in zip(params, grads)]


def log1p_exp(t: torch.Tensor, nonnegative: bool = False) -> torch.Tensor:
    """`log(1 + exp(t))` as `max(t, 0) + log1p(exp(-|t|))`: the function of torch's softplus
    kernel, which cannot overflow and needs no threshold (inductor writes torch's softplus as
    `log1p(exp(t))` behind one); with `nonnegative=True` (`t` a root or a magnitude)
    `t + log(1 + exp(-t))`, where `1 + exp(-t)` lies in (1, 2] and `log` is as accurate as
    `log1p` and cheaper.  On a CPU these functions, not memory, bound the compiled steps of
    SAdam, SRAdam and BAdam."""
    if nonnegative:
        return t + log1p_unit(torch.exp(-t), via_log=True)
    return t.clamp_min(0) + log1p_unit(torch.exp(-t.abs()))


#: `log1p(e) / e` on [0, 1] as a polynomial of degree 8 in `e`, lowest power first: the least-
#: squares fit (float64) at 2,000 Chebyshev nodes of [0, 1], turned into powers of `e`.
_LOG1P_UNIT = (0.9999999705406564, -0.49999501516786754, 0.333192713424934,
               -0.24844369892407042, 0.1911143108034768, -0.13674769705046674,
               0.0783616680131092, -0.029588507389466286, 0.005253457796170311)


def log1p_unit(e: torch.Tensor, via_log: bool = False) -> torch.Tensor:
    """`log1p(e)` for `e` in [0, 1]: for float32 on a CPU, `e * P(e)` with `P` the polynomial
    `_LOG1P_UNIT`, a relative error of at most 3.1e-8 in exact arithmetic and 1.9e-7 (about 1.6
    ulp) evaluated in float32, and 0 at `e = 0` as `log1p`; else torch's `log1p(e)` (or
    `log(1 + e)`, with `via_log`).  Nine multiply-adds suffice on [0, 1], where torch's vectorised
    `log` and `log1p` (Sleef's, accurate to 1 ulp over all floats) bound a compiled softplus on a
    CPU."""
    if e.dtype == torch.float32 and e.device.type == "cpu":
        acc = _LOG1P_UNIT[-1]
        for c in _LOG1P_UNIT[-2::-1]:  # Horner's rule
            acc = acc * e + c
        return e * acc
    return torch.log(1 + e) if via_log else torch.log1p(e)


# ---- an optimizer step in a user's compiled graph ----------------------------------------------
#: The optimizers a compiled graph can step, by `id` (registered when made or unpickled).
_STEPPERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def register_for_compile(opt) -> None:
    """Make `opt` steppable from a compiled graph (`step_as_one_operation`)."""
    _STEPPERS[id(opt)] = opt


# The parameters and gradients are the operation's arguments, both written in place (a block may
# change the gradient, fastai's `l2_reg`), so that the graph orders the step after the
# gradients are made and before anything reads the parameters; the optimizer's state is its own.
# The operation runs host Python (schedules, step counts), which a CUDA graph cannot replay:
# inductor's CUDA graphs (mode="reduce-overhead") leave it out.
@torch.library.custom_op("optcraft::step", mutates_args=("params", "grads"),
                         tags=(torch.Tag.cudagraph_unsafe,)
                         if hasattr(torch.Tag, "cudagraph_unsafe") else ())
def _step(optimizer: int, params: list[torch.Tensor],
          grads: list[Optional[torch.Tensor]]) -> None:
    opt = _STEPPERS.get(optimizer)
    if opt is None:
        raise RuntimeError("optcraft::step: the optimizer this compiled graph steps no longer "
                           "exists (a graph compiled for one optimizer steps only that one)")
    # The arguments are the parameters and gradients as the graph has them. A graph that does
    # not write its inputs in place (functionalised, e.g. the "aot_eager" backend) passes
    # copies, and writes them into the parameters after the graph: the step then runs on the
    # graph's values and leaves its results in the copies.
    real = [p for group in opt._groups() for p in group["params"]]
    copies = [(p, a) for p, a in zip(real, params) if a.data_ptr() != p.data_ptr()]
    swapped = [(p, p.grad, g) for p, g in zip(real, grads)
               if g is not None and (p.grad is None or g.data_ptr() != p.grad.data_ptr())]
    with torch.no_grad():
        for p, a in copies:
            p.copy_(a)
    for p, _, g in swapped:
        p.grad = g
    try:
        opt._step()
    finally:
        for p, old, _ in swapped:
            p.grad = old
    with torch.no_grad():
        for p, a in copies:
            a.copy_(p)


@_step.register_fake
def _(optimizer, params, grads) -> None:
    return None


def step_as_one_operation(opt, params: list) -> None:
    """Under dynamo: `opt._step()` as one operation of the graph being traced, over `params`
    (every parameter of the optimizer)."""
    _step(id(opt), params, [p.grad for p in params])
