"""Execution: how a chain of blocks runs over a parameter group.

No algorithm knows which path runs it.  The engine splits a group's parameters (those with a
gradient) into *buckets* that can share one vectorised call: same device, same dtype, the same
DTensor layout (FSDP2's sharded parameters), the same state keys, and the same non-tensor state
values (`step`, `do_wd`, ...), so that a per-parameter flag such as `do_wd=False` is honoured
without splitting the user's groups.  A complex parameter runs as its real view (`as_real`).  Then
it runs the chain on each bucket with one of the paths:

* ``reference``: one parameter at a time, the semantics oracle of the tests;
* ``foreach``: every bucket at once through `TensorList` (torch._foreach_* kernels);
* ``fused`` and ``compiled``: see `optcraft.fused` and `optcraft.compiled`;
* ``auto``: ``fused`` where the chain is exactly one of torch's kernels, else ``foreach``.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable, Sequence

import torch

from . import precision
from .blocks.base import transient_names, unwrap_partial, vectorised
from .tensorlist import ParamList, TensorList, distribution_of

IMPLS = ("auto", "reference", "foreach", "fused", "compiled")
HIDDEN_GROUP_KEYS = ("params", "param_names")


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    return impl


class Bucket:
    """Parameters of one group that run together, with their state gathered as lists."""

    __slots__ = ("params", "grads", "tensor_keys", "scalars")

    def __init__(self, params, grads, tensor_keys, scalars):
        self.params, self.grads = params, grads
        self.tensor_keys, self.scalars = tensor_keys, scalars

    # Both look each parameter's state up once: a tensor's hash is a Python call, and with 2,000
    # small tensors those lookups were a sizeable part of a step.  A bucket holds one dtype, so
    # whether it is complex is asked of its first parameter.
    def gather(self, state) -> dict[str, Any]:
        complex_ = self.params[0].is_complex()
        states = [state[p] for p in self.params]
        found = {k: TensorList([as_real(st[k]) if complex_ else st[k] for st in states])
                 for k in self.tensor_keys}
        found.update(self.scalars)
        return found

    def scatter(self, state, values: dict[str, Any]) -> None:
        complex_ = self.params[0].is_complex()
        states = [state[p] for p in self.params]
        for key, value in values.items():
            if isinstance(value, TensorList):
                for p, st, v in zip(self.params, states, value.tensors):
                    st[key] = _like_param(v, p) if complex_ else v
            elif isinstance(value, PerParam):
                for st, v in zip(states, value):
                    st[key] = v
            else:
                for st in states:
                    st[key] = value


def as_real(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor as its real view (a trailing dimension of 2), as torch.optim does: every
    block then treats the real and imaginary parts as two real numbers.  For the per-tensor norms
    of LARC and LAMB this changes nothing, since |z|^2 = re^2 + im^2 element by element."""
    return torch.view_as_real(t) if t.is_complex() else t


def _like_param(value, p: torch.Tensor):
    """State a block made from the real view of a complex parameter, stored as complex (the
    parameter's shape, as torch.optim keeps it) so checkpoints hold the parameter's shape."""
    if p.is_complex() and isinstance(value, torch.Tensor) and not value.is_complex() and \
            value.dim() == p.dim() + 1 and value.shape[-1] == 2:
        if value.stride(-1) != 1 or any(s % 2 for s in value.stride()[:-1]):
            value = value.contiguous()
        return torch.view_as_complex(value)
    return value


class PerParam(list):
    """Non-tensor values that differ between the parameters of a bucket (from a plain callback)."""


def _freeze(value):
    try:
        hash(value)
        return value
    except TypeError:
        return ("<unhashable>", id(value))


#: The foreach path's buckets hold at most this many elements, or the largest parameter when
#: that is bigger: the temporaries a block makes (Adam's denominator, LAMB's update) then never
#: span the whole model, while small tensors still share one foreach call.
MIN_CHUNK_NUMEL = 1 << 20


def _chunks(items: list, max_numel: int | None, size=lambda t: t.numel()) -> list[list]:
    """`items` in consecutive chunks of at most `max_numel` elements (an item larger than that is
    a chunk of its own)."""
    if max_numel is None:
        return [items]
    chunks, current, total = [], [], 0
    for item in items:
        if current and total + size(item) > max_numel:
            chunks.append(current)
            current, total = [], 0
        current.append(item)
        total += size(item)
    return chunks + [current] if current else chunks


def make_buckets(group: dict, state, max_params: int | None = None,
                 max_numel: int | None = None) -> list[Bucket]:
    """Split a group's parameters that have a gradient into buckets (see module docstring).

    `max_params=1` gives one bucket per parameter (the reference path); `max_numel` bounds the
    elements of a bucket (a parameter bigger than that is a bucket of its own).
    """
    keyed: dict[tuple, list] = defaultdict(list)
    for p in group["params"]:
        grad = p.grad
        if grad is None:
            continue
        tensor_keys, scalars = [], []
        for k, v in (state.get(p) or {}).items():
            if isinstance(v, torch.Tensor):
                tensor_keys.append(k)
            else:
                scalars.append((k, _freeze(v)))
        # In the state's own order, not sorted: parameters whose keys were made in another order
        # form a bucket of their own, which is as correct, and sorting cost a third of the
        # bucketing of 2,000 small tensors.
        keyed[(p.device, p.dtype, distribution_of(p), tuple(tensor_keys), tuple(scalars))].append(p)
    buckets = []
    for (_, _, _, tensor_keys, _), params in keyed.items():
        st = state.get(params[0]) or {}
        scalars = {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)}
        step = max_params or len(params)
        for i in range(0, len(params), step):
            for chunk in _chunks(params[i:i + step], max_numel):
                buckets.append(Bucket(chunk, [p.grad for p in chunk], tensor_keys, scalars))
    return buckets


def hypers_of(group: dict) -> dict[str, Any]:
    return {k: v for k, v in dict.items(group) if k not in HIDDEN_GROUP_KEYS}


def _plain_scalars(hyper: dict) -> dict:
    """Eager paths take Python numbers: a 0-d tensor hyperparameter (a tensor lr) is read once."""
    out = {}
    for k, v in hyper.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.requires_grad:
            v = v.item()
        out[k] = v
    return out


def apply_chain(cbs: Sequence[Callable], params: ParamList, values: dict, hyper: dict,
                slice_numel: int | None = None) -> dict:
    """fastai's step for every parameter of a bucket: each callback in turn gets the parameters
    and `{**state, **hyper}` and may return a dict of new state.  Returns the state after it.
    With `slice_numel`, elementwise blocks run on slices of CPU tensors (see `SLICE_NUMEL`)."""
    values = dict(values)
    if slice_numel and max(t.numel() for t in params.tensors) <= slice_numel:
        slice_numel = None  # nothing to slice in this bucket: no block needs asking
    for cb in cbs:
        fn = vectorised(cb)
        if fn is not None:
            if slice_numel and _sliceable(cb, params, values, hyper):
                result = _run_sliced(cb, fn, params, values, hyper, slice_numel)
            else:
                result = fn(params, **{**values, **hyper})
        else:
            result = _run_per_parameter(cb, params, values, hyper)
        if isinstance(result, dict):
            values.update(result)
    return values


#: The eager paths run an elementwise block (`block(elementwise=...)`) on slices of at most this
#: many elements of CPU tensors larger than that.  A block's operations (Adam's square root,
#: addition and division) then each pass over a slice held in the cache rather than over the
#: whole tensor in memory, and its temporaries are the size of a slice.  Not on a GPU, where
#: passes over memory are cheap and each slice's kernels would be launches.
SLICE_NUMEL = 1 << 20


def _sliceable(cb, params: ParamList, values: dict, hyper: dict) -> bool:
    """Whether `cb` may run on slices of this bucket (which holds a tensor larger than a slice):
    an elementwise block (for these keyword arguments), plain CPU tensors, all contiguous, its own
    state already there (a block creating its state makes whole tensors), and every state tensor
    the parameter's size or a 0-d value per tensor."""
    fn, bound = unwrap_partial(cb)
    flag = getattr(fn, "elementwise", False)
    if callable(flag):
        flag = flag(**{**values, **hyper, **bound})
    tensors = params.tensors
    if not flag or tensors[0].device.type != "cpu" or distribution_of(tensors[0]) is not None:
        return False  # (a DTensor's flat slices would be a redistribution, not a view)
    if not all(isinstance(values.get(k), TensorList) for k in fn.state_names):
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


def _run_sliced(cb, fn: Callable, params: ParamList, values: dict, hyper: dict,
                slice_numel: int) -> dict | None:
    """`fn` on batches of flat slices (views) of the bucket's tensors, each batch at most
    `slice_numel` elements; a 0-d value per tensor goes whole with each slice of its tensor."""
    pieces = [(i, start, min(start + slice_numel, t.numel()))
              for i, t in enumerate(params.tensors) for start in range(0, t.numel(), slice_numel)]
    batches = _chunks(pieces, slice_numel, size=lambda piece: piece[2] - piece[1])

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
            raise RuntimeError(f"{cb!r} is declared elementwise but replaced the gradient or "
                               f"returned new state tensors; declare it elementwise=False")
    if not isinstance(result, dict):
        return None
    return {k: values[k] if isinstance(v, TensorList) else v for k, v in result.items()}


def _same(a: TensorList, b: TensorList) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a.tensors, b.tensors))


def run_bucket(cbs: Sequence[Callable], bucket: Bucket, state, hyper: dict,
               master_weights: bool = True, kernel: Callable | None = None,
               slice_numel: int | None = None, transient: frozenset = frozenset()) -> None:
    """One step of a bucket: the chain (or `kernel`, a fused or compiled form of it) on the
    parameters, and the new state written back.

    `kernel(bucket, state, hyper, params, eager)` returns the new state; `eager()` runs the chain
    as the foreach path does.  `transient`: names of values the chain passes along but does not
    keep (`blocks.base.transient_names`, worked out once per step by `step_groups`).
    Half-precision parameters run on their float32 master copies (see `optcraft.precision`);
    complex ones as their real views."""
    with_master = precision.uses_master(bucket.params[0].dtype, master_weights)
    if with_master:
        masters = precision.masters_of(bucket.params, state)
        params = ParamList(masters, precision.upcast(bucket.grads))
    elif bucket.params[0].is_complex():  # (a bucket holds one dtype)
        params = ParamList([as_real(p) for p in bucket.params],
                           [as_real(g) for g in bucket.grads])
    else:
        params = ParamList(bucket.params, bucket.grads)

    def eager() -> dict:
        values = bucket.gather(state)
        values.pop(precision.MASTER, None)
        return apply_chain(cbs, params, values, hyper, slice_numel)

    values = eager() if kernel is None else kernel(bucket, state, hyper, params, eager)
    values.pop(precision.MASTER, None)
    for name in transient:
        values.pop(name, None)
    bucket.scatter(state, values)
    if with_master:
        precision.write_back(bucket.params, masters)


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
            raise RuntimeError(f"callback {getattr(cb, '__name__', cb)!r} returned {k!r} for some "
                               f"parameters of a bucket but not others")
        if all(isinstance(v, torch.Tensor) for v in vs):
            merged[k] = TensorList(vs)
        elif all(v == vs[0] for v in vs):
            merged[k] = vs[0]
        else:
            merged[k] = PerParam(vs)
    return merged


def resolve(impl: str, cbs: Sequence[Callable]) -> str:
    """The path `impl` runs `cbs` on: "auto" is "fused" where torch has a kernel for the chain,
    else "foreach"; "fused" for a chain torch has no kernel for is an error."""
    from . import fused

    has_kernel = fused.recognise(cbs) is not None
    if impl == "auto":
        return "fused" if has_kernel else "foreach"
    if impl == "fused" and not has_kernel:
        names = " -> ".join(getattr(unwrap_partial(cb)[0], "__name__", repr(cb)) for cb in cbs)
        raise ValueError(f"impl='fused': torch has no fused kernel for the chain {names} (only "
                         f"SGD and Adam/AdamW chains have one); use impl='auto', 'foreach' or "
                         f"'compiled'")
    return impl


def kernel_for(impl: str, cbs: Sequence[Callable]) -> Callable | None:
    """The bucket kernel of a resolved path (None: run the chain eagerly)."""
    if impl == "fused":
        from . import fused

        step = fused.recognise(cbs)

        def fused_kernel(bucket, state, hyper, params, eager):
            # DTensor (FSDP2's sharded parameters) has no sharding rule for `_fused_sgd_`
            # (torch 2.13): a sharded bucket runs the chain through foreach, which DTensor has.
            if distribution_of(bucket.params[0]) is not None or \
                    not fused.layouts_match(params.tensors, params.grad.tensors, bucket, state):
                return eager()
            return step(bucket, state, hyper, params.tensors, params.grad.tensors)
        return fused_kernel
    if impl == "compiled":
        from .compiled import CompiledChain

        return CompiledChain(cbs)
    return None


def step_groups(cbs: Sequence[Callable], groups: Iterable[dict], state, impl: str,
                master_weights: bool = True, kernel: Callable | None = None) -> None:
    """Run the chain over every group with the resolved path `impl` (see `resolve`) and its
    `kernel` (see `kernel_for`)."""
    max_params = 1 if impl == "reference" else None
    plan = []
    for group in groups:
        hyper = _plain_scalars(hypers_of(group))
        # Only the eager foreach path makes temporaries the size of its bucket (fused kernels and
        # inductor's loops make none; the compiled path splits buckets its own way).
        max_numel = None
        if impl == "foreach":
            max_numel = max([MIN_CHUNK_NUMEL] + [p.numel() for p in group["params"]])
        buckets = make_buckets(group, state, max_params, max_numel)
        if impl == "compiled":
            from .compiled import split_bucket

            buckets = [piece for bucket in buckets for piece in split_bucket(bucket)]
        plan.append((buckets, hyper))
    if impl == "compiled":
        kernel.begin_step()
    # The reference path stays the plain per-parameter chain, the oracle the others are tested
    # against; the others run elementwise blocks on slices (see `SLICE_NUMEL`).
    slice_numel = None if impl == "reference" else SLICE_NUMEL
    transient = transient_names(cbs)
    for buckets, hyper in plan:
        for bucket in buckets:
            run_bucket(cbs, bucket, state, hyper, master_weights, kernel, slice_numel, transient)
