"""The ``compiled`` path: the whole chain of a bucket as one `torch.compile` graph (or a few, see
`graph_segments`).

The blocks are traced as they are.  Under tracing, `TensorList` arithmetic is written tensor by
tensor rather than as `torch._foreach_*` calls (see `optcraft.tensorlist._foreach`): inductor fuses
a tensor's operations into one loop, so a chain of five blocks reads and writes each tensor about
once instead of once per block.

What keeps it from recompiling:

* every numeric hyperparameter and numeric state value (`lr`, `mom`, `wd`, `step`, ...) enters the
  graph as a 0-d tensor, so a new value (a schedule, a torch scheduler, `set_hyper`) is new data,
  not a new graph; hyperparameters a block declares `static` (used in Python control flow, such as
  RAdam's `beta`), booleans and strings are constants of the graph;
* blocks declared `host` (the step count) run in Python before the graph, on numbers, and the
  graph is handed their results as 0-d tensors at their place in the chain: the new step count
  is known without reading it back from the device (a `.item()` per piece would make the CPU
  wait for each piece's kernels on a GPU);
* each kind of bucket (its device, dtype, tensor shapes, state keys and constants) gets its own
  compiled function, so several groups or dtypes do not share dynamo's per-function cache;
* the first step that meets a kind of bucket runs it eagerly (foreach), which creates the state;
  it is compiled from the next step on, with the state it will keep.

What gets compiled, and in what pieces (`split_bucket`): a bucket's tensors of at least
`tensorlist.PER_TENSOR_MIN_NUMEL` elements, grouped by shape, at most `CHUNK_TENSORS` to a graph.
A model repeats its layers, so most pieces are alike and share one compiled function: GPT-2
small's 50 large tensors need 6 graphs (Lamb's compile in about 25 s cold, 5 s from a warm
cache), where one graph of them all took over a minute (inductor's scheduling grows faster than
the graph).  Smaller tensors (biases, norms) stay on the foreach path: one kernel per operation
over all of them is cheaper than inductor's loop per tensor, and costs no compiling.

On a CPU the chain is cut after each block declared `ends_graph` (`graph_segments`), and each
segment is a graph of its own, fed the state the one before it left.  LAMB's trust ratio is such a
block: it needs whole-tensor norms of an update made from the moments the blocks before it have
just changed.  In one graph inductor sums the norms in one loop and then, in a second, computes
the moments again from the gradient, stores them and moves the parameter (it does not store an
updated input in a reduction's loop when the graph reads it again), so each element of the
gradient, moments and parameter is read twice.  Cut after the trust ratio, the first graph's
loop reads them once, stores the moments and sums the norms; the second reads the stored
moments and the parameter (seven tensors read per element instead of eight).  On a CPU, whose
caches write back a line just read at little more than the cost of the read, reads are what a
step pays for: Lamb on GPT-2 small about 7% faster.  On a GPU, where every byte moved counts
alike, both forms move as many bytes, and the chain stays one graph.  (The per-channel blocks of
`blocks.research` also end a graph, inside the block, with a dynamo graph break: a workaround
for an inductor failure, see `_end_graph` there; this cut is between blocks, each segment a
compiled function of its own.)

Compiled code is cached across processes by inductor's on-disk cache (`TORCHINDUCTOR_CACHE_DIR`,
by default under the system's temporary folder): a warm start skips code generation.
"""
from __future__ import annotations

import functools
import types
from typing import Any, Callable, Sequence

import torch

from . import tensorlist
from .blocks.base import block, unwrap_partial, vectorised
from .tensorlist import ParamList, TensorList

_NUMBER = (int, float)

#: The most tensors of one shape that one compiled graph holds (see the module docstring).
CHUNK_TENSORS = 4


def split_bucket(bucket) -> list:
    """The compiled path's pieces of a bucket: its small tensors (run eagerly, see
    `CompiledChain`) in chunks of at most `engine.MIN_CHUNK_NUMEL` elements, as the foreach path
    has them, then its large ones grouped by shape in chunks of `CHUNK_TENSORS`."""
    from .engine import MIN_CHUNK_NUMEL, _chunks  # the engine imports this module

    grad_of = {id(p): g for p, g in zip(bucket.params, bucket.grads)}
    small, by_shape = [], {}
    for p in bucket.params:
        if _is_small(p):
            small.append(p)
        else:
            by_shape.setdefault(tuple(p.shape), []).append(p)
    pieces = _chunks(small, MIN_CHUNK_NUMEL)
    for same in by_shape.values():
        pieces += [same[i:i + CHUNK_TENSORS] for i in range(0, len(same), CHUNK_TENSORS)]
    return [type(bucket)(piece, [grad_of[id(p)] for p in piece], bucket.tensor_keys,
                         bucket.scalars) for piece in pieces]


def _is_small(t: torch.Tensor) -> bool:
    return t.numel() < tensorlist.PER_TENSOR_MIN_NUMEL


def static_names(cbs: Sequence[Callable]) -> frozenset[str]:
    """Hyperparameters some block of the chain uses in Python control flow."""
    names = set()
    for cb in cbs:
        fn, _ = unwrap_partial(cb)
        names.update(getattr(fn, "static", ()))
    return frozenset(names)


def _is_number(v) -> bool:
    return isinstance(v, _NUMBER) and not isinstance(v, bool)


class CompiledChain:
    """The compiled bucket steps of one optimizer, one compiled function per kind of bucket."""

    def __init__(self, cbs: Sequence[Callable]):
        self.cbs = list(cbs)
        self.static = static_names(cbs)
        self.functions: dict[tuple, Callable] = {}
        self.first_seen: dict[tuple, int] = {}  # kind of piece -> the step that first met it
        self.steps = 0
        self._scalars: dict[tuple, tuple] = {}  # slot -> (0-d tensor, the value it holds)
        self.host = [i for i, cb in enumerate(self.cbs)
                     if getattr(unwrap_partial(cb)[0], "host", False)]
        self.segments = graph_segments(self.cbs)

    def begin_step(self) -> None:
        """Called by the engine before each optimizer step's pieces."""
        self.steps += 1

    def __call__(self, bucket, state, hyper: dict, params, eager: Callable) -> dict:
        if all(_is_small(t) for t in params.tensors):
            return eager()  # small tensors: the foreach path (see `split_bucket`)
        values = bucket.gather(state)
        constants = {k: v for k, v in {**values, **hyper}.items()
                     if not isinstance(v, list) and not _is_tensor_list(v)
                     and (k in self.static or not _is_number(v))}
        key = (params.tensors[0].device, params.tensors[0].dtype,
               tuple(tuple(t.shape) for t in params.tensors),
               tuple(sorted(bucket.tensor_keys)), tuple(sorted((k, repr(v))
                                                               for k, v in constants.items())))
        # The step that first meets a kind of piece runs all such pieces eagerly, however many:
        # at the first step that creates the state, and a graph traced then (for the second
        # piece of a shape) would hold the state's creation, used once and compiled for nothing.
        if self.first_seen.setdefault(key, self.steps) == self.steps:
            return eager()
        dtype = params.tensors[0].dtype if params.tensors[0].is_floating_point() else \
            torch.float32
        device = params.tensors[0].device
        segments = self.segments_on(device)
        fns = self.functions.get(key)
        if fns is None:
            options = SEGMENT_OPTIONS if len(segments) > 1 else None
            fns = self.functions[key] = [_fresh_compiled(_bucket_step, options)
                                         for _ in segments]
        numbers = {k: self._as_tensor(k, v, dtype, device)
                   for k, v in {**values, **hyper}.items()
                   if k not in constants and _is_number(v)}
        state_values = {k: v for k, v in values.items() if k not in numbers}
        hyper_values = {k: v for k, v in hyper.items() if k not in numbers}
        inputs = {**state_values, **{k: numbers[k] for k in values if k in numbers}}
        hypers = {**hyper_values, **{k: numbers[k] for k in hyper if k in numbers}}
        after_host, given = self._run_host_blocks(params, values, hyper)
        given = {i: {k: self._as_tensor(f"{k}@{i}", v, dtype, device) for k, v in out.items()}
                 for i, out in given.items()}
        result = {k: _plain(v) for k, v in inputs.items()}
        for fn, (start, end) in zip(fns, segments):
            result = fn(self.cbs[start:end], params.tensors, params.grad.tensors, result, hypers,
                        {i - start: out for i, out in given.items() if start <= i < end})
        result = {k: TensorList(v) if isinstance(v, list) else v for k, v in result.items()}
        # Numeric state goes back as Python numbers, as the eager paths keep it: the host blocks'
        # own (no device read); one a device block wrote is read back.
        for k, v in result.items():
            if k in after_host:
                result[k] = after_host[k]
            elif k in values and _is_number(values[k]) and isinstance(v, torch.Tensor):
                result[k] = _read_back(v, like=values[k])
        return result

    def segments_on(self, device: torch.device) -> list[tuple[int, int]]:
        """The graphs the chain runs as on `device`: cut (`graph_segments`) on a CPU, whole
        elsewhere (see the module docstring)."""
        return self.segments if device.type == "cpu" else [(0, len(self.cbs))]

    def _run_host_blocks(self, params, values: dict, hyper: dict) -> tuple[dict, dict]:
        """The chain's host blocks, in order, on the numeric state and hyperparameters: the
        numeric state they leave, and each one's result by its place in the chain."""
        current, given = dict(values), {}
        for i in self.host:
            out = vectorised(self.cbs[i])(params, **{**current, **hyper}) or {}
            if not all(_is_number(v) for v in out.values()):
                raise TypeError(f"{self.cbs[i]!r} is a host block but returned "
                                f"{out!r}: a host block returns numbers only")
            given[i] = out
            current.update(out)
        return {k: current[k] for out in given.values() for k in out}, given

    def _as_tensor(self, key: str, value, dtype, device) -> torch.Tensor:
        """A 0-d tensor holding `value`, reused step after step (filled in place), so the graph
        sees the same input tensor with new data.  It is filled only when the value changed: the
        pieces of a step share their hyperparameters, and on a GPU each fill is a kernel launch."""
        slot = (key, dtype, device)
        t, held = self._scalars.get(slot, (None, None))
        if t is None or held != value:
            if t is None:
                t = torch.empty((), dtype=dtype, device=device)
            t.fill_(value)
            self._scalars[slot] = (t, value)
        return t


def graph_segments(cbs: Sequence[Callable]) -> list[tuple[int, int]]:
    """The chain cut after each block declared `ends_graph` (but the last), as `(start, end)`
    ranges of it: on a CPU each is traced as a graph of its own, the state after one going into
    the next (see the module docstring)."""
    cuts = [i + 1 for i, cb in enumerate(cbs[:-1])
            if getattr(unwrap_partial(cb)[0], "ends_graph", False)]
    bounds = [0, *cuts, len(cbs)]
    return list(zip(bounds[:-1], bounds[1:]))


def _read_back(t: torch.Tensor, like):
    """A 0-d tensor's value as a Python number of the type of `like` (on a GPU: a wait for the
    kernels that compute it)."""
    number = t.item()
    return round(number) if isinstance(like, int) else number


def _is_tensor_list(v) -> bool:
    return isinstance(v, TensorList)


def _plain(v):
    return v.tensors if isinstance(v, TensorList) else v


def _bucket_step(cbs, params, grads, values, hyper, given) -> dict[str, Any]:
    """The traced function: the chain over plain lists of tensors (what dynamo passes in and out
    most simply), as `TensorList`s inside; the host blocks' results, `given` by their place in
    the chain, stand in for those blocks."""
    from .engine import apply_chain  # the engine imports this module

    values = {k: TensorList(v) if isinstance(v, list) else v for k, v in values.items()}
    cbs = [functools.partial(_given, result=given[i]) if i in given else cb
           for i, cb in enumerate(cbs)]
    result = apply_chain(cbs, ParamList(params, grads), values, hyper)
    return {k: _plain(v) for k, v in result.items()}


@block
def _given(p, result, **kwargs):
    """A host block's result, worked out in Python before the graph and passed in as tensors."""
    return dict(result)


#: inductor's options for the graphs of a chain cut in segments: tensors' loops are fused
#: sideways only where they share at least this many bytes.  By default a few shared scalars
#: (a bias correction) suffice, and the greedy fusion then merges several tensors' moment loops
#: before each tensor's parameter loop can join its own, which reads the gradient twice.
SEGMENT_OPTIONS = {"score_fusion_memory_threshold": 1 << 16}


def _fresh_compiled(fn: Callable, options=None) -> Callable:
    """`torch.compile(fn)` on a copy of `fn`'s code: dynamo keeps its cache (and its limit on
    recompilations) per code object, and each kind of bucket should have a cache of its own."""
    code = fn.__code__.replace()
    copy = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return torch.compile(copy, dynamic=False, options=options)
