"""The ``compiled`` path: the whole chain of a bucket traced as one graph and compiled by
inductor, `torch.compile`'s compiler (cut in a few graphs where the chain says, see `cut`).

How (`TracedStep`): the chain runs once on fake tensors under `make_fx`, which records its
operations as a graph of aten operations; that graph goes to inductor as it is
(`torch._inductor.standalone_compile`, or `torch.compile` on a torch without it).  dynamo, which
`torch.compile` of the chain itself would use, interprets the blocks' Python bytecode by
bytecode, and the chain's Python cost it about a second a graph, in every process, warm cache or
not.  The blocks are traced as they are.  Traced, `TensorList` arithmetic is written the way
`optcraft.compiler_hints` says (tensor by tensor rather than as `torch._foreach_*` calls, among
others): inductor fuses a tensor's operations into one loop, so a chain of five blocks reads and
writes each tensor about once instead of once per block.

What keeps it from compiling again:

* every numeric hyperparameter and numeric state value (`lr`, `mom`, `wd`, `step`, ...) enters the
  graph as a 0-d tensor, so a new value (a schedule, a torch scheduler, `set_hyper`) is new data,
  not a new graph; hyperparameters a block declares `static` (used in Python control flow, such as
  RAdam's `beta`), booleans and strings are constants of the graph; a `switches` hyperparameter
  (SGD's momentum, a weight decay) is the number 0 while it is 0 (its part of the chain is then
  left out of the graph) and a tensor otherwise;
* blocks that read numbers (`reads="numbers"`: the step count) run in Python before the graph,
  on numbers, and the
  graph is handed their results as 0-d tensors at their place in the chain: the new step count
  is known without reading it back from the device (a `.item()` per piece would make the CPU
  wait for each piece's kernels on a GPU);
* each kind of bucket (its device, dtype, tensor shapes, state keys and constants) gets its own
  `TracedStep`, which compiles again only for inputs of a new signature (`_signature`: what
  dynamo's guards would check), and the state a step leaves keeps the signature it was traced
  for;
* the first step runs eagerly (foreach), which creates the state; the kind of bucket that
  holds all the state the chain's blocks declare for it compiles at once (at the second step),
  with the state it will keep.

What gets compiled, and in what pieces (`CompiledPath.buckets`): a bucket's tensors of at least
`compiler_hints.PER_TENSOR_MIN_NUMEL` elements, grouped by shape, at most `CHUNK_TENSORS` to a graph.
A model repeats its layers, so most pieces are alike and share one compiled function: GPT-2
small's 50 large tensors need 6 graphs, where one graph of them all took over a minute to
compile (inductor's scheduling grows faster than the graph).  Smaller tensors (biases, norms)
stay on the foreach path: one kernel per operation over all of them is cheaper than inductor's
loop per tensor, and costs no compiling.

Where the traced graph is cut (`compiler_hints.end_graph`, each part compiled as a graph of its
own, fed what the one before computed): after a per-channel reduction (`TensorList.channel_rms`,
around an inductor failure), and, on a CPU, after LAMB's trust ratio, which this path runs in a
form of its own (`COMPILED_FORMS`, `lamb_trust_ratio_stored`): it needs whole-tensor norms of an
update made from the moments the blocks before it have just changed.  In one graph inductor sums the norms in one loop and then, in a second,
computes the moments again from the gradient, stores them and moves the parameter (it does not
store an updated input in a reduction's loop when the graph reads it again), so each element of
the gradient, moments and parameter is read twice.  Cut after the trust ratio, the first graph's
loop reads them once, stores the moments and sums the norms; the second reads the stored moments
and the parameter (seven tensors read per element instead of eight).  On a CPU, whose caches
write back a line just read at little more than the cost of the read, reads are what a step pays
for.  On a GPU, where every byte moved counts alike, both
forms move as many bytes, and the chain stays one graph.

Quantised state (`state_bits=8` or `4`, `optcraft.state_codecs`) enters a piece's graph as it is
stored, codes and block scales: the graph decodes it, runs the chain and encodes the new state
(`state_codecs.decode_traced` / `encode_traced`, codes found by a table lookup rather than a
search, `nearest_codes`), so inductor fuses the codec into the step's loops (`CompiledPath.decode`
keeps those entries encoded; a piece run eagerly decodes them in `run`).

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

from .. import compiler_hints as hints
from ..blocks.base import block, is_zero, spec_of, vectorised
from ..blocks.layerwise import _LAMB, lamb_direction, lamb_ratio, lamb_trust_ratio
from ..blocks.base import transient
from ..distributed import distribution_of
from ..state_codecs import StateCodec, decode_quantized, decode_traced, encode_traced
from ..tensorlist import ParamList, TensorList
from .buckets import Bucket, chunks, make_buckets
from .chain import Chain, Stage, apply
from .foreach import MIN_CHUNK_NUMEL, ForeachPath

_NUMBER = (int, float)

#: The most tensors of one shape that one compiled graph holds (see the module docstring).
CHUNK_TENSORS = 4


def _is_small(t: torch.Tensor) -> bool:
    return t.numel() < hints.PER_TENSOR_MIN_NUMEL


def _is_graph_number(v) -> bool:
    """Whether `v` enters the graph as a 0-d tensor: a number, but not a bool (a flag, which is a
    constant of the graph; `tensorlist`'s arithmetic takes bools as numbers)."""
    return isinstance(v, _NUMBER) and not isinstance(v, bool)


class CompiledPath(ForeachPath):
    """The compiled bucket steps of one chain, one compiled function per kind of piece and stage.

    Pieces (`buckets`): a bucket's small tensors (run eagerly on the foreach path) in chunks of
    at most `foreach.MIN_CHUNK_NUMEL` elements, as the foreach path has them, then its large ones
    grouped by shape in chunks of `CHUNK_TENSORS`."""

    name = "compiled"

    def __init__(self, chain: Chain):
        super().__init__(chain)
        self.functions: dict[tuple, TracedStep] = {}
        self.first_seen: dict[tuple, int] = {}  # kind of piece -> the step that first met it
        self.steps = 0
        self._scalars: dict[tuple, tuple] = {}  # slot -> (0-d tensor, the value it holds)
        self.untraceable: set[tuple] = set()  # kinds of piece run eagerly (see `Untraceable`)

    @property
    def compiles(self) -> int:
        """How many times a step has been traced and compiled so far: once for each kind of
        piece, and again for an input whose signature changed (see `TracedStep`)."""
        return sum(fn.compiles for fn in self.functions.values())

    def begin_step(self) -> None:
        self.steps += 1

    def buckets(self, params, state) -> list[Bucket]:
        pieces = []
        for bucket in make_buckets(params, state):
            small, by_shape = [], {}
            for p in bucket.params:
                if _is_small(p):
                    small.append(p)
                else:
                    by_shape.setdefault(tuple(p.shape), []).append(p)
            found = chunks(small, MIN_CHUNK_NUMEL) if small else []
            for same in by_shape.values():
                found += [same[i:i + CHUNK_TENSORS] for i in range(0, len(same), CHUNK_TENSORS)]
            pieces += [bucket.with_params(piece) for piece in found]
        return pieces

    def decode(self, codec: StateCodec, values: dict, bucket, dtype: torch.dtype) -> dict:
        """As every path does, but quantised entries already in the codec's format stay encoded
        for a piece this path may compile: its graph decodes them, runs the chain and encodes
        them again (`state_codecs.decode_traced`), all fused by inductor; `run` decodes them
        itself where it runs the piece eagerly."""
        keep = frozenset()
        # (FSDP2's sharded codes are decoded from their shards: see `distributed.quantize_shards`)
        if not all(_is_small(p) for p in bucket.params) and \
                distribution_of(bucket.params[0]) is None:
            keep = codec.in_own_format(values, bucket.params, self.chain.kept)
        return codec.decode(values, bucket.params, dtype, self.chain.kept, keep)

    def run(self, stage: Stage, bucket, params: ParamList, values: dict, hyper: dict) -> dict:
        def eager():
            # (entries `decode` left encoded for the graph, decoded here; encoded after the step
            # by the engine, as on the other paths)
            decode_quantized(values, bucket.params, params.tensors[0].dtype)
            return ForeachPath.run(self, stage, bucket, params, values, hyper)

        if all(_is_small(t) for t in params.tensors):
            return eager()  # small tensors: the foreach path (see `buckets`)
        static, switches = self.chain.static, self.chain.switches
        merged = {**values, **hyper}
        # (a tensor, a tensor lr or a count kept on the device, is an input of the graph)
        constants = {k: v for k, v in merged.items()
                     if not isinstance(v, (list, TensorList, torch.Tensor))
                     and (k in static or not _is_graph_number(v)
                          or (k in switches and is_zero(v)))}
        stage_index = self.chain.stages.index(stage)
        key = (stage_index, params.tensors[0].device, params.tensors[0].dtype,
               tuple(tuple(t.shape) for t in params.tensors),
               tuple(sorted(k for k, v in values.items() if isinstance(v, TensorList))),
               tuple(sorted((k, repr(v)) for k, v in constants.items())))
        # A kind of piece whose state is still to be made runs eagerly, all its pieces, however
        # many, at the step that first meets it: a graph traced then (for the second piece of a
        # shape) would hold the state's creation, used once and compiled for nothing.  With all
        # the state the chain's blocks declare for it, the kind compiles at once (a chain that
        # declares none may still make some: it waits a step).
        required = self.chain.required_state(bucket.params[0])
        complete = bool(required) and required <= set(values)
        if key in self.untraceable or (
                not complete and self.first_seen.setdefault(key, self.steps) == self.steps):
            return eager()
        dtype = params.tensors[0].dtype if params.tensors[0].is_floating_point() else \
            torch.float32
        device = params.tensors[0].device
        fn = self.functions.get(key)
        if fn is None:
            fn = self.functions[key] = TracedStep(self.chain_on(stage.cbs, device))
        numbers = {k: self._as_tensor(k, v, dtype, device)
                   for k, v in merged.items() if k not in constants and _is_graph_number(v)}
        inputs = {k: numbers.get(k, v) for k, v in values.items()}
        hypers = {k: numbers.get(k, v) for k, v in hyper.items()}
        after_host, given = _run_host_blocks(fn.cbs, fn.host, params, values, hyper)
        given = {i: {k: self._as_tensor(f"{k}@{i}", v, dtype, device) for k, v in out.items()}
                 for i, out in given.items()}
        try:
            result = fn(params.tensors, params.grad.tensors,
                        {k: _plain(v) for k, v in inputs.items()}, hypers, given)
        except Untraceable as e:  # traced on fake tensors: nothing has changed yet
            self.untraceable.add(key)
            warnings.warn(f"impl='compiled' runs this chain eagerly (the foreach path) for "
                          f"parameters of shapes {key[3]}: {e}. Written with tensor operations "
                          f"(optcraft.tensorlist.where for a choice), it compiles.", stacklevel=7)
            return eager()
        result = {k: TensorList(v) if isinstance(v, list) else v for k, v in result.items()}
        # Numeric state goes back as Python numbers, as the eager paths keep it: the host blocks'
        # own (no device read); one a device block wrote is read back.
        for k, v in result.items():
            if k in after_host:
                result[k] = after_host[k]
            elif k in values and _is_graph_number(values[k]) and v is inputs.get(k):
                result[k] = values[k]  # handed back unchanged (a group's value): no read back
            elif k in values and _is_graph_number(values[k]) and isinstance(v, torch.Tensor):
                result[k] = _read_back(v, like=values[k])
        return result

    @staticmethod
    def chain_on(cbs: list, device: torch.device) -> list:
        """The blocks as they are traced on `device`: each block that has a compiled form
        (`COMPILED_FORMS`) in that form, and on a CPU a `cut` after each such form that ends a
        graph (but the last block)."""
        traced = []
        for i, cb in enumerate(cbs):
            spec, bound = spec_of(cb)
            form = COMPILED_FORMS.get(spec.name) if spec is not None else None
            if form is None:
                traced.append(cb)
                continue
            replacement, ends_graph = form
            traced.append(functools.partial(replacement, **bound) if bound else replacement)
            if ends_graph and device.type == "cpu" and i < len(cbs) - 1:
                traced.append(cut)
        return traced

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


def _stored(t: TensorList) -> TensorList:
    """`t`; on a CPU, `t` as written back to its own memory (for a `ParamList`, the parameters
    so, with their gradients): inductor computes a tensor that the graph updates in place wherever
    it is read, and writes it back in a loop of its own.  Read through an identity `as_strided`
    (`compiler_hints.materialised`), the new values are written once, in the first loop that reads
    them, and that can be a reduction's loop.  Only where nothing later in the graph reads the
    values: inductor would then keep them in a temporary."""
    if not hints.compiling_for_cpu(t.tensors):
        return t
    values = [hints.materialised(x) for x in t.tensors]
    return ParamList(values, t.grad) if isinstance(t, ParamList) else TensorList(values)


@block(**_LAMB, state=dict(trust_ratio=transient))
def lamb_trust_ratio_stored(p, mom, step, sqr_mom, grad_avg, sqr_avg, eps, eps_root=0.0, wd=0.0,
                            do_wd=True, norm="rms", wd_in_ratio=False, max_ratio=10.0, **kwargs):
    """`lamb_trust_ratio` as this path runs it: the trust ratio alone is handed on (the update
    would be a parameter-sized temporary: `lamb_step` computes it again in the loop that moves
    `p`), and on a CPU the norms are one reduction over the whole tensor taken of the moments as
    stored (`_stored`): the loop that sums the norms then also writes the moments the blocks
    before it updated, and the graph after the cut reads them back instead of computing them
    again from the gradient (seven tensors read per element instead of eight)."""
    p, grad_avg, sqr_avg = _stored(p), _stored(grad_avg), _stored(sqr_avg)
    update = lamb_direction(p, mom, step, sqr_mom, grad_avg, sqr_avg, eps, eps_root, wd, do_wd,
                            wd_in_ratio)
    if hints.compiling_for_cpu(p.tensors):
        with hints.flat_norms():
            return {"trust_ratio": lamb_ratio(p, update, norm, max_ratio)}
    return {"trust_ratio": lamb_ratio(p, update, norm, max_ratio)}


#: Blocks this path runs in a form of its own (block name -> (form, whether a CPU graph ends
#: after it)), as the fused path runs chains as torch's kernels: the same numbers, written for
#: inductor.  The algorithm stays in the block; the form only changes how it is computed.
COMPILED_FORMS: dict[str, tuple[Callable, bool]] = {
    lamb_trust_ratio.spec.name: (lamb_trust_ratio_stored, True),
}


def _run_host_blocks(chain, host: Sequence[int], params, values: dict,
                     hyper: dict) -> tuple[dict, dict]:
    """The chain's host blocks (at the places `host` in it), in order, on the numeric state and
    hyperparameters: the numeric state they leave, and each one's result by its place."""
    current, given = dict(values), {}
    for i in host:
        cb = chain[i]
        out = vectorised(cb)(params, **{**current, **hyper}) or {}
        if not all(_is_graph_number(v) for v in out.values()):
            raise TypeError(f"{cb!r} is a host block but returned {out!r}: a host block returns "
                            f"numbers only")
        given[i] = out
        current.update(out)
    return {k: current[k] for out in given.values() for k in out}, given


@block
def cut(p, **kwargs):
    """The compiled path's graph ends here (`compiler_hints.end_graph`): what follows is a graph
    of its own.  `CompiledPath.chain_on` puts it after the compiled forms that end a graph."""
    hints.end_graph()


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
    values = {k: TensorList(v) if isinstance(v, list) else v for k, v in values.items()}
    cbs = [functools.partial(_given, result=given[i]) if i in given else cb
           for i, cb in enumerate(cbs)]
    # quantised state (8/4-bit codes and their scales) is decoded and encoded in the graph
    formats = decode_traced(values, [tuple(p.shape) for p in params], params[0].dtype)
    result = apply(cbs, ParamList(params, grads), values, hyper)
    encode_traced(result, formats)
    return {k: _plain(v) for k, v in result.items()}


@block
def _given(p, result, **kwargs):
    """A host block's result, worked out in Python before the graph and passed in as tensors."""
    return dict(result)


class Untraceable(Exception):
    """The chain cannot be one graph: its Python needs a tensor's value (see `CompiledPath`)."""


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
                     if spec_of(cb)[0] is not None and spec_of(cb)[0].reads == "numbers"]
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
        with hints.tracing() as cuts:
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
