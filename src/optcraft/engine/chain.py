"""A chain of blocks as the engine runs it: what its blocks' specifications say together, and
how it runs over one bucket.

`Chain(cbs)` reads each block's `Spec` once: the hyperparameters the chain brings, which are
static or switches, the state it keeps per parameter and per group, what it hands on, and its
*stages*: a block that reads every parameter at once (`reads="all"`) runs once per group between
two passes over the buckets, so a chain is cut in stages there.  Every path runs a stage's
blocks on a bucket with `apply` (the paths differ in how they bucket and what they hand it).
"""
from __future__ import annotations

import inspect
from collections import defaultdict
from typing import Any, Callable, Collection, Sequence

import torch

from ..blocks.base import (PerParam, Spec, StateRule, block, callback_name, group, spec_of,
                          vectorised)
from ..distributed import distribution_of, is_row_sharded, run_on_owners
from ..state_codecs import StateCodec
from ..tensorlist import ParamList, TensorList
from .buckets import chunks


class Stage:
    """Blocks that run bucket by bucket (`cbs`), then, optionally, a block that reads every
    parameter at once (`all_block`, once per group)."""

    __slots__ = ("cbs", "all_block")

    def __init__(self, cbs: list, all_block=None):
        self.cbs, self.all_block = cbs, all_block


class Chain:
    """The callbacks of one optimizer chain and what their specifications declare together."""

    def __init__(self, cbs: Sequence[Callable], capturable: bool = False):
        #: the callbacks as given; `cbs` runs them, with `capturable`'s blocks (`on_device`)
        self.given, self.capturable = list(cbs), capturable
        self.cbs = [on_device(cb) if capturable and _counts(cb) else cb for cb in self.given]
        specs = [spec_of(cb) for cb in self.cbs]
        self.specs: list[tuple[Spec | None, dict]] = specs
        self.defaults: dict[str, Any] = {}
        self.static: set[str] = set()
        self.switches: set[str] = set()
        #: state entries kept per parameter (tensors and numbers), by name, first declaration
        self.kept: dict[str, StateRule] = {}
        #: whether each kept entry may be missing, for the block (and bound keywords) keeping it
        self._optional: dict[str, bool] = {}
        self.transient: set[str] = set()
        self.group_state: dict[str, StateRule] = {}
        self.summed: set[str] = set()
        #: train/eval: the blocks (with their bound keywords) that move parameters between the
        #: point a chain trains at and the point it is evaluated at (schedule-free)
        self.eval_points: list[tuple[Spec, dict]] = []
        for cb, (spec, bound) in zip(self.cbs, specs):
            if spec is None:
                self.defaults.update(getattr(cb, "defaults", None) or {})
                continue
            self.defaults.update({k: v for k, v in spec.hypers.items() if k not in bound})
            self.static |= spec.static
            self.switches |= spec.switches
            for name, rule in spec.state.items():
                if rule.kind in ("tensor", "number"):
                    self.kept.setdefault(name, rule)
                    self._optional.setdefault(name, rule.optional_for(bound))
                elif rule.kind == "transient":
                    self.transient.add(name)
                elif rule.kind == "group":
                    self.group_state.setdefault(name, rule)
                elif rule.kind == "summed":
                    self.summed.add(name)
            if spec.eval_point is not None:
                self.eval_points.append((spec, bound))
        self.stages = self._stages()
        #: the positions of the blocks that read numbers only (the step count)
        self.host = [i for i, (spec, bound) in enumerate(specs)
                     if spec is not None and spec.reads == "numbers"]

    def _stages(self) -> list[Stage]:
        stages, current = [], []
        for cb, (spec, bound) in zip(self.cbs, self.specs):
            if spec is not None and spec.reads_for(bound) == "all":
                stages.append(Stage(current, cb))
                current = []
            else:
                current.append(cb)
        if current or not stages:
            stages.append(Stage(current))
        return stages

    def required_state(self, param: torch.Tensor) -> set[str]:
        """The entries a parameter that has taken a step with this chain holds for sure: those
        kept whose rule gives `param` a shape (or a number) and which are not optional."""
        return {name for name, rule in self.kept.items() if not self._optional[name] and
                (rule.kind == "number" or rule.shape_for(param) is not None)}

    def state_bytes(self, param: torch.Tensor, dtype: torch.dtype | None = None,
                    state_bits: int = 32, made: Collection[str] | None = None) -> int:
        """The bytes of tensor state this chain keeps for `param` (computed in `dtype`, default
        the parameter's), stored at `state_bits` (codes and scales at 8 and 4 bits, as
        `optcraft.state_codecs` keeps them): memory accounting, from the specifications.
        Optional entries (made once a switch turns on: RMSProp's momentum) count when `made`
        names them, or all of them when `made` is None (the most the chain may keep)."""
        codec = StateCodec(state_bits)
        return sum(codec.stored_bytes(param, rule, dtype) for name, rule in self.kept.items()
                   if made is None or not self._optional[name] or name in made)

    def names(self) -> list[str]:
        return [callback_name(cb) for cb in self.cbs]

    def __repr__(self) -> str:
        return " -> ".join(self.names())


def _counts(cb) -> bool:
    """Whether `cb` is a block that keeps Python numbers (the step count) from numbers."""
    spec, bound = spec_of(cb)
    return spec is not None and spec.reads_for(bound) == "numbers" and \
        bool(spec.entries("number"))


def on_device(cb):
    """A block that keeps numbers (`reads="numbers"`: the step count) as a chain built with
    `capturable=True` runs it: once per group and step (`reads="all"`, on the parameters with a
    gradient; not at all where none has one), its numbers kept in the group's state as 0-d
    float32 tensors on the parameters' device and written in place.  The step then hands the
    device no Python number that changes from step to step, and writes the count where the next
    step reads it, so a CUDA graph that captured one step replays the next.  The count is the
    group's: a parameter that had no gradient at a step is counted with its group."""
    spec, bound = spec_of(cb)
    numbers = set(spec.entries("number"))
    fn = vectorised(cb)

    def counted(p, **values):
        if not p.tensors:
            return {}
        given = {k: v for k, v in values.items() if not (k in numbers and v is None)}
        found = {}
        for name, value in (fn(p, **given) or {}).items():
            kept = values.get(name)
            if name not in numbers:
                found[name] = value
            elif isinstance(kept, torch.Tensor):
                found[name] = kept.copy_(value)
            else:  # (the first step: the count made on the device)
                found[name] = torch.as_tensor(value, dtype=torch.float32,
                                              device=p.tensors[0].device).clone()
        return found

    counted.__name__ = counted.__qualname__ = f"{spec.name}_on_device"
    hypers = {k: v for k, v in spec.hypers.items() if k not in bound}
    state = {name: group(None) if name in numbers else rule for name, rule in spec.state.items()}
    keyword = inspect.Parameter.KEYWORD_ONLY
    counted.__signature__ = inspect.Signature(
        [inspect.Parameter("p", inspect.Parameter.POSITIONAL_ONLY),
         *(inspect.Parameter(k, keyword, default=None) for k in (*hypers, *state)),
         inspect.Parameter("values", inspect.Parameter.VAR_KEYWORD)])
    return block(hypers=hypers, state=state, reads="all")(counted)


def apply(cbs: Sequence[Callable], params: ParamList, values: dict, hyper: dict,
          slice_numel: int | None = None) -> dict:
    """fastai's step for every parameter of a bucket: each callback in turn gets the parameters
    and `{**state, **hyper}` and may return a dict of new state.  Returns the state after it.
    With `slice_numel`, blocks that read elements run on slices of CPU tensors (see
    `SLICE_NUMEL`)."""
    values = dict(values)
    if slice_numel and max(t.numel() for t in params.tensors) <= slice_numel:
        slice_numel = None  # nothing to slice in this bucket: no block needs asking
    for cb in cbs:
        fn = vectorised(cb)
        if fn is not None:
            if on_owners(cb, params, values, hyper):
                result = run_on_owners(fn, params, values, hyper)
            elif slice_numel and sliceable(cb, params, values, hyper):
                result = run_sliced(cb, fn, params, values, hyper, slice_numel)
            else:
                result = fn(params, **{**values, **hyper})
        else:
            result = _run_per_parameter(cb, params, values, hyper)
        if isinstance(result, dict):
            values.update(result)
    return values


#: The eager paths run a block that reads elements on slices of at most this many elements of
#: CPU tensors larger than that.  A block's operations (Adam's square root, addition and
#: division) then each pass over a slice held in the cache rather than over the whole tensor in
#: memory, and its temporaries are the size of a slice.  Not on a GPU, where passes over memory
#: are cheap and each slice's kernels would be launches.
SLICE_NUMEL = 1 << 20


def on_owners(cb, params: ParamList, values: dict, hyper: dict) -> bool:
    """Whether `cb` reads whole matrices (for these keyword arguments) and the bucket holds
    FSDP2-sharded parameters: then each matrix runs whole on one owner rank
    (`optcraft.distributed.run_on_owners`), never on a shard."""
    if not is_row_sharded(params.tensors[0]):
        return False
    spec, bound = spec_of(cb)
    return spec is not None and spec.reads_for({**values, **hyper, **bound}) == "matrix"


def sliceable(cb, params: ParamList, values: dict, hyper: dict) -> bool:
    """Whether `cb` may run on slices of this bucket (which holds a tensor larger than a slice):
    a block that reads elements (for these keyword arguments), plain CPU tensors, all contiguous,
    its own state already there (a block creating its state makes whole tensors), and every state
    tensor the parameter's size or a 0-d value per tensor."""
    spec, bound = spec_of(cb)
    if spec is None or spec.reads_for({**values, **hyper, **bound}) != "elements":
        return False
    tensors = params.tensors
    if tensors[0].device.type != "cpu" or distribution_of(tensors[0]) is not None:
        return False  # (a DTensor's flat slices would be a redistribution, not a view)
    if not all(isinstance(values.get(k), TensorList) for k, rule in spec.kept.items()
               if rule.kind == "tensor"):
        return False
    if not all(t.is_contiguous() and g.is_contiguous() for t, g in zip(tensors, params.grad)):
        return False
    for v in values.values():
        if isinstance(v, PerParam):  # one value per parameter, from a plain callback
            return False
        if isinstance(v, TensorList) and not all(
                (s.numel() == t.numel() and s.is_contiguous()) or (s.dim() == 0 and t.numel() > 1)
                for s, t in zip(v.tensors, tensors)):
            return False
    return True


def run_sliced(cb, fn: Callable, params: ParamList, values: dict, hyper: dict,
                slice_numel: int) -> dict | None:
    """`fn` on batches of flat slices (views) of the bucket's tensors, each batch at most
    `slice_numel` elements; a 0-d value per tensor goes whole with each slice of its tensor."""
    pieces = [(i, start, min(start + slice_numel, t.numel()))
              for i, t in enumerate(params.tensors) for start in range(0, t.numel(), slice_numel)]
    batches = chunks(pieces, slice_numel, size=lambda piece: piece[2] - piece[1])

    def cut(tensors, batch):
        return [tensors[i] if tensors[i].numel() != params.tensors[i].numel()
                else tensors[i].view(-1)[a:b] for i, a, b in batch]
    result = None
    for batch in batches:
        sliced = {k: TensorList(cut(v.tensors, batch)) if isinstance(v, TensorList) else v
                  for k, v in values.items()}
        part = ParamList(cut(params.tensors, batch), cut(params.grad.tensors, batch))
        grads = part.grad
        result = fn(part, **{**sliced, **hyper})
        if part.grad is not grads or any(
                isinstance(v, TensorList) and not (k in sliced and _same(v, sliced[k]))
                for k, v in (result if isinstance(result, dict) else {}).items()):
            raise RuntimeError(f"{callback_name(cb)} is declared to read elements but replaced "
                               f"the gradient or returned new state tensors; declare it "
                               f"reads='tensor'")
    if not isinstance(result, dict):
        return None
    return {k: values[k] if isinstance(v, TensorList) else v for k, v in result.items()}


def _same(a: TensorList, b: TensorList) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a.tensors, b.tensors))


def _run_per_parameter(cb, params: ParamList, values: dict, hyper: dict) -> dict:
    """A plain fastai callback `cb(p, **{**state, **hyper})`, called once per parameter with plain
    tensors; the gradient it sees is the one earlier blocks left (L2 regularisation, say)."""
    updates: dict[str, list] = defaultdict(list)
    for i, p in enumerate(params.tensors):
        own = {k: (v.tensors[i] if isinstance(v, TensorList) else
                   v[i] if isinstance(v, PerParam) else v) for k, v in values.items()}
        original_grad = p.grad
        swapped = params.grad.tensors[i] is not original_grad
        if swapped:
            p.grad = params.grad.tensors[i]
        try:
            result = cb(p, **{**own, **hyper})
        finally:
            if swapped:
                p.grad = original_grad
        if isinstance(result, dict):
            for k, v in result.items():
                updates[k].append(v)
    merged = {}
    for k, vs in updates.items():
        if len(vs) != len(params):
            raise RuntimeError(f"callback {callback_name(cb)} returned {k!r} for some parameters "
                               f"of a bucket but not others")
        if all(isinstance(v, torch.Tensor) for v in vs):
            merged[k] = TensorList(vs)
        elif all(v == vs[0] for v in vs):
            merged[k] = vs[0]
        else:
            merged[k] = PerParam(vs)
    return merged
