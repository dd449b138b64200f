"""The ``compiled`` path: the whole chain of a bucket traced as one graph and compiled by
inductor, `torch.compile`'s compiler (cut in a few graphs where the chain says, see `cut`).

How (`TracedStep`): the chain runs once on fake tensors under `make_fx`, which records its
operations as a graph of aten operations; that graph goes to inductor as it is
(`torch._inductor.standalone_compile`, or `torch.compile` on a torch without it).  dynamo, which
`torch.compile` of the chain itself would use, interprets the blocks' Python bytecode by
bytecode, and the chain's Python cost it about a second a graph, in every process, warm cache or
not: Lamb's first compiled step on GPT-2 small took 9 to 12 s from a warm cache, and takes 3 to
5 s traced so.  The blocks are traced as they are.  Traced, `TensorList` arithmetic is written
tensor by tensor rather than as `torch._foreach_*` calls (see `optcraft.tensorlist._foreach` and
`tensorlist.compiling`): inductor fuses a tensor's operations into one loop, so a chain of five
blocks reads and writes each tensor about once instead of once per block.

What keeps it from compiling again:

* every numeric hyperparameter and numeric state value (`lr`, `mom`, `wd`, `step`, ...) enters the
  graph as a 0-d tensor, so a new value (a schedule, a torch scheduler, `set_hyper`) is new data,
  not a new graph; hyperparameters a block declares `static` (used in Python control flow, such as
  RAdam's `beta`), booleans and strings are constants of the graph;
* blocks declared `host` (the step count) run in Python before the graph, on numbers, and the
  graph is handed their results as 0-d tensors at their place in the chain: the new step count
  is known without reading it back from the device (a `.item()` per piece would make the CPU
  wait for each piece's kernels on a GPU);
* each kind of bucket (its device, dtype, tensor shapes, state keys and constants) gets its own
  `TracedStep`, which compiles again only for inputs of a new signature (`_signature`: what
  dynamo's guards would check), and the state a step leaves keeps the signature it was traced
  for;
* the first step runs eagerly (foreach), which creates the state; the kind of bucket that
  holds all the state the chain's blocks declare compiles at once (at the second step), with the
  state it will keep.

What gets compiled, and in what pieces (`split_bucket`): a bucket's tensors of at least
`tensorlist.PER_TENSOR_MIN_NUMEL` elements, grouped by shape, at most `CHUNK_TENSORS` to a graph.
A model repeats its layers, so most pieces are alike and share one compiled function: GPT-2
small's 50 large tensors need 6 graphs, where one graph of them all took over a minute to
compile (inductor's scheduling grows faster than the graph).  Smaller tensors (biases, norms)
stay on the foreach path: one kernel per operation over all of them is cheaper than inductor's
loop per tensor, and costs no compiling.

Where the traced graph is cut (`tensorlist.end_graph`, each part compiled as a graph of its own,
fed what the one before computed): inside a block that says so (the per-channel blocks of
`blocks.research`, around an inductor failure, see `_end_graph` there), and, on a CPU, after each
block declared `ends_graph` (`CompiledChain.chain_on` puts `cut` there).  LAMB's trust ratio is
such a block: it needs whole-tensor norms of an update made from the moments the blocks before it
have just changed.  In one graph inductor sums the norms in one loop and then, in a second,
computes the moments again from the gradient, stores them and moves the parameter (it does not
store an updated input in a reduction's loop when the graph reads it again), so each element of
the gradient, moments and parameter is read twice.  Cut after the trust ratio, the first graph's
loop reads them once, stores the moments and sums the norms; the second reads the stored moments
and the parameter (seven tensors read per element instead of eight).  On a CPU, whose caches
write back a line just read at little more than the cost of the read, reads are what a step pays
for: Lamb on GPT-2 small about 7% faster.  On a GPU, where every byte moved counts alike, both
forms move as many bytes, and the chain stays one graph.

Compiled code is cached across processes by inductor's on-disk cache (`TORCHINDUCTOR_CACHE_DIR`,
by default under the system's temporary folder): a warm start skips code generation, and pays
for the tracing and for inductor's own start-up (importing it, probing the CPU's vector
instructions: about 3 s once a process on this machine).
"""
from __future__ import annotations

import collections.abc
import functools
import warnings
from typing import Any, Callable, Sequence

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from torch.fx.passes.split_module import split_module
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
from torch.utils import _pytree as pytree

from . import tensorlist
from .blocks.base import block, unwrap_partial, vectorised
from .tensorlist import ParamList, TensorList, end_graph

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
        self.functions: dict[tuple, TracedStep] = {}
        self.first_seen: dict[tuple, int] = {}  # kind of piece -> the step that first met it
        self.state_names = frozenset(name for cb in self.cbs
                                     for name in getattr(unwrap_partial(cb)[0], "state_names", ()))
        self.steps = 0
        self._scalars: dict[tuple, tuple] = {}  # slot -> (0-d tensor, the value it holds)
        self.untraceable: set[tuple] = set()  # kinds of piece run eagerly (see `Untraceable`)

    @property
    def compiles(self) -> int:
        """How many times a step has been traced and compiled so far: once for each kind of
        piece, and again for an input whose signature changed (see `TracedStep`)."""
        return sum(fn.compiles for fn in self.functions.values())

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
        # A kind of piece whose state is still to be made runs eagerly, all its pieces, however
        # many, at the step that first meets it: a graph traced then (for the second piece of a
        # shape) would hold the state's creation, used once and compiled for nothing.  With all
        # the state the chain's blocks declare, the kind compiles at once (a chain that declares
        # none may still make some: it waits a step).
        present = {*bucket.tensor_keys, *bucket.scalars}
        complete = bool(self.state_names) and self.state_names <= present
        if key in self.untraceable or (
                not complete and self.first_seen.setdefault(key, self.steps) == self.steps):
            return eager()
        dtype = params.tensors[0].dtype if params.tensors[0].is_floating_point() else \
            torch.float32
        device = params.tensors[0].device
        fn = self.functions.get(key)
        if fn is None:
            fn = self.functions[key] = TracedStep(self.chain_on(device))
        numbers = {k: self._as_tensor(k, v, dtype, device)
                   for k, v in {**values, **hyper}.items()
                   if k not in constants and _is_number(v)}
        state_values = {k: v for k, v in values.items() if k not in numbers}
        hyper_values = {k: v for k, v in hyper.items() if k not in numbers}
        inputs = {**state_values, **{k: numbers[k] for k in values if k in numbers}}
        hypers = {**hyper_values, **{k: numbers[k] for k in hyper if k in numbers}}
        after_host, given = _run_host_blocks(fn.cbs, fn.host, params, values, hyper)
        given = {i: {k: self._as_tensor(f"{k}@{i}", v, dtype, device) for k, v in out.items()}
                 for i, out in given.items()}
        try:
            result = fn(params.tensors, params.grad.tensors,
                        {k: _plain(v) for k, v in inputs.items()}, hypers, given)
        except Untraceable as e:  # traced on fake tensors: nothing has changed yet
            self.untraceable.add(key)
            warnings.warn(f"impl='compiled' runs this chain eagerly (the foreach path) for "
                          f"parameters of shapes {key[2]}: {e}. Written with tensor operations "
                          f"(optcraft.tensorlist.where for a choice), it compiles.", stacklevel=7)
            return eager()
        result = {k: TensorList(v) if isinstance(v, list) else v for k, v in result.items()}
        # Numeric state goes back as Python numbers, as the eager paths keep it: the host blocks'
        # own (no device read); one a device block wrote is read back.
        for k, v in result.items():
            if k in after_host:
                result[k] = after_host[k]
            elif k in values and _is_number(values[k]) and isinstance(v, torch.Tensor):
                result[k] = _read_back(v, like=values[k])
        return result

    def chain_on(self, device: torch.device) -> list:
        """The chain as it is traced on `device`: on a CPU with `cut` after each block declared
        `ends_graph` (but the last), so that each part is a graph of its own; whole elsewhere
        (see the module docstring)."""
        if device.type != "cpu":
            return self.cbs
        chain = []
        for i, cb in enumerate(self.cbs):
            chain.append(cb)
            if i < len(self.cbs) - 1 and getattr(unwrap_partial(cb)[0], "ends_graph", False):
                chain.append(cut)
        return chain

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


def _run_host_blocks(chain, host: Sequence[int], params, values: dict,
                     hyper: dict) -> tuple[dict, dict]:
    """The chain's host blocks (at the places `host` in it), in order, on the numeric state and
    hyperparameters: the numeric state they leave, and each one's result by its place."""
    current, given = dict(values), {}
    for i in host:
        cb = chain[i]
        out = vectorised(cb)(params, **{**current, **hyper}) or {}
        if not all(_is_number(v) for v in out.values()):
            raise TypeError(f"{cb!r} is a host block but returned {out!r}: a host block returns "
                            f"numbers only")
        given[i] = out
        current.update(out)
    return {k: current[k] for out in given.values() for k in out}, given


@block
def cut(p, **kwargs):
    """The compiled path's graph ends here (`tensorlist.end_graph`): what follows is a graph of
    its own.  `CompiledChain.chain_on` puts it after the blocks declared `ends_graph`."""
    end_graph()


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
    """The traced function: the chain over plain lists of tensors (what pytree flattens), as
    `TensorList`s inside; the host blocks' results, `given` by their place in the chain, stand in
    for those blocks."""
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


class Untraceable(Exception):
    """The chain cannot be one graph: its Python needs a tensor's value (see `CompiledChain`)."""


class TracedStep:
    """The chain's step for one kind of piece as compiled code: `_bucket_step` traced to a graph
    of aten operations (`make_fx` on fake tensors, which runs the blocks' Python as Python: 0.03
    to 0.17 s a graph on GPT-2 small), cut where the chain says (`end_graph`), and compiled by
    inductor (see the module docstring), once per signature of its inputs.

    What dynamo's guards would check, the signature does (`_signature`): each tensor input's
    dtype, device, shape and strides, which inputs are the same tensor, and each other input's
    value; a new signature is traced and compiled anew (`compiles` counts them)."""

    def __init__(self, cbs: Sequence[Callable]):
        self.cbs = list(cbs)
        self.host = [i for i, cb in enumerate(self.cbs)  # run before the graph, in Python
                     if getattr(unwrap_partial(cb)[0], "host", False)]
        self.graphs: dict[tuple, _Graph] = {}
        self.compiles = 0

    def __call__(self, params, grads, values, hyper, given) -> dict[str, Any]:
        leaves, spec = pytree.tree_flatten((params, grads, values, hyper, given))
        key = (spec, _signature(leaves))
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = _Graph(self.cbs, leaves, spec)
            self.compiles += 1
        return graph(leaves)


def _signature(leaves: list) -> tuple:
    """What a graph traced for `leaves` (the step's flattened inputs) assumes of them."""
    seen: dict[int, int] = {}
    out = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            # a tensor passed twice is one input of the graph: which one it repeats is part of
            # the signature.  Distinct tensors are taken not to overlap in memory (parameters
            # and their state never do); views of one storage that do not overlap, such as the
            # per-tensor scalars the foreach path leaves, compile as separate inputs anyway.
            first = seen.setdefault(id(x), len(seen))
            out.append((x.dtype, x.device, x.shape, x.stride(), first))
        else:
            out.append((type(x), x if isinstance(x, collections.abc.Hashable) else repr(x)))
    return tuple(out)


class _Graph:
    """The compiled step of one signature of inputs (see `TracedStep`).

    Traced, the step's outputs are sorted: a tensor the graph computes is a graph output; an input
    returned as it is (an unchanged state value, or one updated in place) is handed back as that
    input; anything else (None, a flag) is a constant of the trace."""

    def __init__(self, cbs, leaves: list, spec):
        self.inputs = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        # the other inputs, constants of the graph (no tensor is kept: a state tensor the step
        # replaces must be freed)
        constants = [None if isinstance(x, torch.Tensor) else x for x in leaves]

        def flat_step(*tensors):
            xs = list(constants)
            for i, t in zip(self.inputs, tensors):
                xs[i] = t
            outs, self.out_spec = pytree.tree_flatten(
                _bucket_step(cbs, *pytree.tree_unflatten(xs, spec)))
            place = {id(t): n for n, t in enumerate(tensors)}
            self.out_plan, computed = [], []
            for x in outs:
                if isinstance(x, torch.Tensor) and id(x) in place:
                    self.out_plan.append(("input", place[id(x)]))
                elif isinstance(x, torch.Tensor):
                    self.out_plan.append(("output", len(computed)))
                    computed.append(x)
                else:
                    self.out_plan.append(("constant", x))
            return computed

        example = [leaves[i] for i in self.inputs]
        with tensorlist.tracing() as cuts:
            try:
                graph = make_fx(flat_step, tracing_mode="fake")(*example)
            except (GuardOnDataDependentSymNode, DataDependentOutputException,
                    DynamicOutputShapeException) as e:
                raise Untraceable(f"a block's Python depends on a tensor's value ({e})") from e
        if any(node.target is torch.ops.aten._local_scalar_dense.default
               for node in graph.graph.nodes):
            raise Untraceable("a block reads a tensor's value as a Python number (`.item()`, "
                              "`float(t)`, a tensor passed where a number is expected)")
        self.run, self.parts = _compiled_parts(graph, example, cuts)

    def __call__(self, leaves: list) -> dict[str, Any]:
        tensors = [leaves[i] for i in self.inputs]
        computed = self.run(*tensors)
        outs = [tensors[v] if kind == "input" else computed[v] if kind == "output" else v
                for kind, v in self.out_plan]
        return pytree.tree_unflatten(outs, self.out_spec)


#: inductor's options for the graphs of a step that is cut in parts: tensors' loops are fused
#: sideways only where they share at least this many bytes.  By default a few shared scalars
#: (a bias correction) suffice, and the greedy fusion then merges several tensors' moment loops
#: before each tensor's parameter loop can join its own, which reads the gradient twice.
SEGMENT_OPTIONS = {"score_fusion_memory_threshold": 1 << 16}


def _compiled_parts(graph: torch.fx.GraphModule, example: list, cuts: list):
    """`graph` compiled, and how many graphs that makes: whole, or, cut after each node of `cuts`,
    as a graph module that calls each part compiled (with `SEGMENT_OPTIONS`), in order."""
    cuts, part, parts = set(cuts), 0, {}
    for node in graph.graph.nodes:
        parts[node] = part
        if node in cuts and node.op != "placeholder":
            part += 1
    if not any(parts[node] for node in graph.graph.nodes if node.op != "output"):
        return _inductor_compile(graph, example, None), 1
    split = split_module(graph, graph, parts.__getitem__, keep_original_order=True)
    names = [name for name, _ in split.named_children()]
    for name in names:
        sub = getattr(split, name)
        delattr(split, name)
        setattr(split, name, _CompiledOnFirstCall(sub, SEGMENT_OPTIONS))
    return split, len(names)


class _CompiledOnFirstCall:
    """A part of a cut graph, compiled when it is first called, for the inputs it is called with
    (the parts after the first take what the one before computed)."""

    def __init__(self, graph: torch.fx.GraphModule, options: dict):
        self.graph, self.options, self.run = graph, options, None

    def __call__(self, *args):
        if self.run is None:
            self.run = _inductor_compile(self.graph, list(args), self.options)
        return self.run(*args)


def _inductor_compile(graph: torch.fx.GraphModule, example: list, options: dict | None):
    """`graph` compiled by inductor for inputs like `example`, with inductor's config `options`."""
    import torch._inductor  # noqa: F401  (inductor's own start-up, once a process)

    standalone = getattr(torch._inductor, "standalone_compile", None)
    if standalone is None:  # an older torch: dynamo traces the (straight-line) graph again
        return torch.compile(graph, dynamic=False, options=options)
    return standalone(graph, example, dynamic_shapes="from_example_inputs",
                      options={"config_patches": dict(options)} if options else {})
