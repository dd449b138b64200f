"""Collectives for sharded parameters: what a block needs of a whole tensor or of every
parameter, computed from what each rank holds.

* FSDP2's DTensors: `tensorlist` asks `distribution_of` whether a tensor is sharded and hands its
  norms to `sharded_norms`; the engine's sums over every parameter go through `sum_over_ranks`,
  whole-matrix blocks through `run_on_owners`, and `state_codecs` codes 8-bit state of sharded
  tensors with `quantize_shards` / `dequantize_shards`.
* ZeroRedundancyOptimizer's partitions: `partitioned` makes an optimizer whose sums over every
  parameter are also summed over the ranks.

Nothing else in optcraft talks to `torch.distributed` during a step, and every rank makes the
same collectives in the same order.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


def distribution_of(t: torch.Tensor):
    """How a DTensor (FSDP2's sharded parameter) is laid out, `(mesh, placements)`, or None for a
    plain tensor: tensors laid out differently cannot share one foreach call."""
    mesh = getattr(t, "device_mesh", None)
    return None if mesh is None else (mesh, tuple(t.placements))


def sharded_norms(tensors: list, ord) -> list | None:
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
    if isinstance(local, collectives.AsyncCollectiveTensor):
        # Waited for here: the max and min norms go on through views only (`unbind`), which do
        # not wait, and a result never waited for leaves its work in torch's registry, where a
        # later tensor at the same address can be taken for it.
        local = local.wait()
    if power == 2:
        local = local.sqrt()
    elif power is not None:
        local = local.pow(1 / power)
    replicated = [Replicate()] * mesh.ndim
    return [DTensor.from_local(n, mesh, replicated, run_check=False) for n in local.unbind(0)]


def _waited(t):
    """`t`, its pending collective waited for (a functional collective's result is waited for
    only by an operation that is not a view)."""
    from torch.distributed import _functional_collectives as collectives

    return t.wait() if isinstance(t, collectives.AsyncCollectiveTensor) else t


def _items(value) -> list:
    """A per-bucket contribution as a list of numbers or 0-d tensors."""
    return list(value.tensors) if hasattr(value, "tensors") else \
        list(value) if isinstance(value, (list, tuple)) else [value]


def _pending_dims(t) -> tuple | None:
    """The mesh dimensions along which the 0-d DTensor `t` is a pending sum (`Partial("sum")`),
    or None where it is laid out otherwise (then `full_tensor()` is what it is worth)."""
    dims = []
    for dim, placement in enumerate(t.placements):
        if placement.is_partial() and getattr(placement, "reduce_op", "sum") == "sum":
            dims.append(dim)
        elif not placement.is_replicate():
            return None
    return tuple(dims)


def sum_over_ranks(sums: dict, names=(), group=None) -> dict:
    """The totals of values summed over every parameter: `sums` maps each name to its per-bucket
    contributions (numbers, 0-d tensors, or lists of 0-d tensors, one per tensor); each total is
    their sum, in the order given, as one number or 0-d tensor.  A name of `names` with no
    contribution totals 0.

    * A contribution computed from FSDP2's sharded tensors is a 0-d DTensor whose value is a
      pending sum across ranks (`Partial`): the local values of all of them are reduced in one
      all-reduce per mesh (not one per tensor), then added up in order.
    * `group`: the process group over which the optimizer's parameters are partitioned
      (ZeroRedundancyOptimizer, see `partitioned`): each rank's totals cover its own parameters
      only, and one all-reduce over `group` adds them up.

    Every rank makes the same collectives in the same order: names are taken in sorted order
    (a chain keeps them in a set, whose order differs between processes: Prodigy's two sums were
    paired with each other's across ranks that way), and the contributions in bucket order,
    which is the same on every rank (FSDP2's ranks hold a shard of every parameter).
    Collectives are blocking (`torch.distributed.all_reduce`): no result is left pending."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    ordered = sorted(set(sums) | set(names))
    items = {name: [x for value in sums.get(name, ()) for x in _items(value)] for name in ordered}
    # 1. FSDP2's pending sums: their local values stacked, one all-reduce per mesh, dimension
    #    and dtype (in order of first appearance, the same on every rank).
    pending: dict = {}
    for name in ordered:
        for i, x in enumerate(items[name]):
            if not isinstance(x, DTensor):
                continue
            dims = _pending_dims(x)
            if dims is None:
                items[name][i] = _waited(x.full_tensor())
                continue
            local = x.to_local()
            if not dims:  # replicated: the local value is the value
                items[name][i] = local
                continue
            key = (id(x.device_mesh), dims, local.dtype, local.device)
            pending.setdefault(key, (x.device_mesh, []))[1].append((name, i, local))
    for (_, dims, _, _), (mesh, found) in pending.items():
        stacked = torch.stack([local.reshape(()) for _, _, local in found])
        for dim in dims:
            dist.all_reduce(stacked, group=mesh.get_group(dim))
        for (name, i, _), value in zip(found, stacked.unbind(0)):
            items[name][i] = value
    # 2. each total, in order
    totals = {}
    for name in ordered:
        total = 0.0
        for x in items[name]:
            if isinstance(x, torch.Tensor) and isinstance(total, torch.Tensor) and \
                    x.device != total.device:
                x = x.to(total.device)
            total = total + x
        totals[name] = total
    # 3. over the ranks of a partitioned optimizer
    if group is not None and ordered:
        totals = _over_partition(totals, {name: len(items[name]) for name in ordered}, group)
    return totals


def _over_partition(totals: dict, counts: dict, group) -> dict:
    """`totals` summed over the ranks of `group`, in one all-reduce (float64; each total back in
    its own dtype where it is a tensor).  `counts`: how many contributions each total has on this
    rank; a total with none on any rank stays the number 0, as in one process (a block tells
    "no parameter had a gradient" by it: Prodigy then leaves its step count).  The counts are
    read back to the host, so this waits for the all-reduce."""
    import torch.distributed as dist

    device = next((t.device for t in totals.values() if isinstance(t, torch.Tensor)), None)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend(group) == "nccl" else torch.device("cpu")
    stacked = torch.stack([torch.as_tensor(totals[name], dtype=torch.float64).to(device)
                           for name in counts] +
                          [torch.tensor(float(n), dtype=torch.float64, device=device)
                           for n in counts.values()])
    dist.all_reduce(stacked, group=group)
    sums, found_anywhere = stacked[:len(counts)].unbind(0), stacked[len(counts):].tolist()
    found = {}
    for name, value, anywhere in zip(counts, sums, found_anywhere):
        local = totals[name]
        if not anywhere:
            found[name] = 0.0
        else:
            found[name] = value.to(local.dtype) if isinstance(local, torch.Tensor) else value
    return found


# ---- block-wise quantised state (optcraft.state_codecs) on FSDP2's shards -----------------------

def _block_of_elements(t, size: int) -> torch.Tensor:
    """For each element of this rank's shard of the row-sharded DTensor `t` (in memory order),
    the block of `size` elements of the whole flattened tensor it falls in."""
    if not is_row_sharded(t):
        raise NotImplementedError(
            f"quantised state of a DTensor laid out as {t.placements} on a {t.device_mesh.ndim}-D "
            f"mesh: only FSDP2's layout (sharded along the first dimension, a 1-D mesh) is "
            f"supported; use state_bits=32 or 16")
    comm = _Comm(t.device_mesh)
    chunk, _ = _rows_of(t.shape[0], comm.world)
    row = math.prod(t.shape[1:])
    local = t.to_local()
    start = comm.me * chunk * row
    return torch.arange(start, start + local.numel(), device=local.device) // size


def quantize_shards(x, size: int, find):
    """`state_codecs.quantize` at 8 bits of the whole tensor `x`, an FSDP2-sharded DTensor, from
    its shards: the same blocks (of `size` elements of the whole flattened tensor, so a block may
    straddle two ranks), the same scales and the same codes as on one process.

    Each rank takes the largest magnitude of its part of every block, one all-reduce (max) of
    `numel / size` numbers makes each block's `absmax`, and each rank codes its own elements
    (`find(normed)`: the codes of values divided by their block's absmax, as `quantize` finds
    them).
    Returns the codes as a uint8 DTensor shaped and sharded as `x` (so that
    torch.distributed.checkpoint reshards them as it reshards `x`; one process keeps them flat,
    padded to whole blocks) and the scales as a plain float32 tensor, the same on every rank."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    blocks = _block_of_elements(x, size)
    local = x.to_local().detach().reshape(-1).float()
    n_blocks = max(1, math.ceil(x.numel() / size))
    absmax = torch.zeros(n_blocks, dtype=torch.float32, device=local.device)
    absmax.scatter_reduce_(0, blocks, local.abs(), "amax")
    dist.all_reduce(absmax, op=dist.ReduceOp.MAX, group=x.device_mesh.get_group(0))
    scaled = local / absmax.clamp_min(torch.finfo(torch.float32).tiny)[blocks]
    codes = find(scaled).to(torch.uint8).reshape(x.to_local().shape)
    return (DTensor.from_local(codes, x.device_mesh, x.placements, run_check=False,
                               shape=x.shape, stride=x.stride()), absmax)


def dequantize_shards(codes, absmax, size: int, values: torch.Tensor, dtype):
    """The DTensor that `quantize_shards` coded as (`codes`, `absmax`), in `dtype`: each rank
    decodes its own elements (no communication)."""
    from torch.distributed.tensor import DTensor

    if distribution_of(absmax) is not None:  # (as torch.distributed.checkpoint may load it)
        absmax = absmax.full_tensor()
    blocks = _block_of_elements(codes, size)
    local = codes.to_local()
    found = values.index_select(0, local.reshape(-1).to(torch.int32))
    found = found.mul_(absmax.to(device=found.device, dtype=torch.float32)[blocks])
    found = found.reshape(local.shape)
    found = found if dtype == torch.float32 else found.to(dtype)
    return DTensor.from_local(found, codes.device_mesh, codes.placements, run_check=False,
                              shape=codes.shape, stride=codes.stride())


# ---- ZeroRedundancyOptimizer: each rank's optimizer holds a partition of the parameters ------

def partitioned(recipe, process_group=None):
    """`recipe` (an optcraft optimizer: `oc.Prodigy`, an `Optimizer` subclass, a function making
    one) as ZeroRedundancyOptimizer's `optimizer_class`, its sums over every parameter taken over
    all the ranks of `process_group` (default: the default group, ZeRO's own default; give the
    group given to ZeRO if another)::

        opt = ZeroRedundancyOptimizer(model.parameters(),
                                      optimizer_class=oc.distributed.partitioned(oc.Prodigy),
                                      lr=1.0)

    ZeRO builds one optimizer per rank over that rank's share of the parameters and runs it as a
    plain local optimizer: nothing tells it that other ranks hold the rest.  A value summed over
    every parameter (Prodigy's two sums, an AdaGrad-Norm accumulator: blocks' `summed` state)
    would be that of the partition.  The optimizer built here adds its totals over the ranks
    (one all-reduce of a few numbers per stage that has such sums; none for other chains), so
    every rank gets the single-process values.

    Refused (ValueError, when ZeRO builds the optimizer): an optimizer wrapped in transforms that
    read every gradient (`clip_by_global_norm`, `skip_nonfinite`): on a partition they would see
    a part of the model and ranks could decide differently.  Under ZeRO every rank holds every
    gradient (DDP averages them), so wrap ZeRO itself instead:
    `Transformed(ZeroRedundancyOptimizer(...), clip_by_global_norm(1.0))`.  Also refused:
    FSDP2's sharded parameters (their sums already cover every rank)."""
    import torch.distributed as dist

    from .hypers import _inner

    def build(params, *args, **kwargs):
        opt = recipe(params, *args, **kwargs)
        inner = _inner(opt)
        if not hasattr(inner, "chains"):
            raise TypeError(f"partitioned: {getattr(recipe, '__name__', recipe)!r} did not make "
                            f"an optcraft Optimizer (got {type(opt).__name__}); a torch "
                            f"optimizer has no sums over every parameter to take over ranks")
        from .transforms import clip_by_global_norm, skip_nonfinite

        whole = [t for t in getattr(opt, "transforms", ()) if isinstance(
            t, (clip_by_global_norm, skip_nonfinite))]
        if whole:
            raise ValueError(
                f"partitioned: {type(whole[0]).__name__} reads every gradient of the model, but "
                f"under ZeroRedundancyOptimizer this optimizer holds only this rank's share of "
                f"the parameters; wrap the ZeroRedundancyOptimizer in Transformed instead (every "
                f"rank holds every gradient under DDP)")
        if any(distribution_of(p) is not None for g in inner.param_groups for p in g["params"]):
            raise ValueError("partitioned: FSDP2's sharded parameters (DTensors) already sum over "
                             "every rank; partitioned is for ZeroRedundancyOptimizer's plain "
                             "tensors")
        if not dist.is_initialized():
            raise RuntimeError("partitioned: torch.distributed is not initialised "
                               "(call init_process_group first)")
        inner.partition_group = dist.group.WORLD if process_group is None else process_group
        return opt

    build.__name__ = build.__qualname__ = \
        f"partitioned({getattr(recipe, '__name__', type(recipe).__name__)})"
    return build


# ---- whole-matrix blocks on FSDP2's shards: one owner rank per matrix --------------------------

#: The work assigned to each rank during the current optimizer step, by process group: owners
#: are balanced over every matrix block call of a step (the reference path calls a block once per
#: parameter).  Reset by `begin_step`.
_loads: dict = {}
#: What `run_on_owners` did on this rank since the last `reset_counters`: matrices processed
#: here, and elements sent and received (tests and docs/integration.md read it).
counters = {"matrices": 0, "sent": 0, "received": 0}


def begin_step() -> None:
    """Called by the engine once per optimizer step."""
    _loads.clear()


def reset_counters() -> None:
    for k in counters:
        counters[k] = 0


def is_row_sharded(t) -> bool:
    """Whether `t` is a DTensor on a 1-D mesh sharded along its first dimension (FSDP2's
    layout), the layout `run_on_owners` takes."""
    layout = distribution_of(t)
    if layout is None:
        return False
    mesh, placements = layout
    return mesh.ndim == 1 and len(placements) == 1 and placements[0].is_shard() and \
        placements[0].dim == 0


def matrix_cost(shape) -> int:
    """The work of a whole-matrix block on a tensor of `shape`, for balancing owners: Newton-
    Schulz's `min(r, c)^2 max(r, c)` for a matrix (`r` its first dimension, `c` the product of
    the others), the element count for a vector."""
    shape = tuple(shape)
    if len(shape) < 2:
        return max(1, math.prod(shape))
    rows, cols = shape[0], math.prod(shape[1:])
    return max(1, min(rows, cols) ** 2 * max(rows, cols))


def assign_owners(shapes: list, world: int, loads: list | None = None) -> list[int]:
    """Owners of the matrices of `shapes` among `world` ranks: in decreasing order of
    `matrix_cost` (ties: the earlier one first), each goes to the rank with the least work so far
    (`loads`, updated in place; ties: the lower rank).  The same on every rank."""
    loads = [0] * world if loads is None else loads
    owners = [0] * len(shapes)
    costs = [matrix_cost(s) for s in shapes]
    for i in sorted(range(len(shapes)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += costs[i]
    return owners


def _rows_of(n: int, world: int) -> tuple[int, list[int]]:
    """FSDP2's split of `n` rows among `world` ranks (torch.chunk's): the padded chunk size and
    each rank's rows."""
    chunk = -(-n // world) if n else 0
    return chunk, [max(0, min(chunk, n - r * chunk)) for r in range(world)]


class _Comm:
    """Gathers to and scatters from one rank of a 1-D mesh's process group."""

    def __init__(self, mesh):
        import torch.distributed as dist

        self.dist = dist
        self.group = mesh.get_group(0)
        self.world = dist.get_world_size(self.group)
        self.me = dist.get_rank(self.group)

    def global_rank(self, r: int) -> int:
        return self.dist.get_global_rank(self.group, r)

    def _layout(self, shape: tuple) -> tuple[int, list[int], int]:
        """(padded rows per rank, each rank's rows, elements per row) of a tensor of `shape`."""
        chunk, rows = _rows_of(shape[0], self.world)
        return chunk, rows, math.prod(shape[1:])

    @staticmethod
    def _by_owner(entries: list, owner_of, dtype_of) -> dict:
        """The positions of `entries` by (owner, dtype, device), in order of first appearance:
        the same on every rank, which lists the same entries in the same order."""
        groups: dict = {}
        for j, entry in enumerate(entries):
            groups.setdefault((owner_of(entry), *dtype_of(entry)), []).append(j)
        return groups

    def gather(self, entries: list) -> list:
        """Whole tensors on their owners from every rank's rows: `entries` are (this rank's
        rows, the whole tensor's shape, its owner); returns each whole tensor on its owner, None
        elsewhere.  One `gather` per owner and dtype: each rank sends its rows of all of that
        owner's tensors in one buffer (each padded to FSDP2's chunk)."""
        out: list = [None] * len(entries)
        for local, shape, _ in entries:
            chunk, rows, _ = self._layout(shape)
            if tuple(local.shape[1:]) != tuple(shape[1:]) or local.shape[0] != rows[self.me]:
                raise RuntimeError(f"a shard of shape {tuple(local.shape)} is not FSDP2's split "
                                   f"of {tuple(shape)} over {self.world} ranks")
        groups = self._by_owner(entries, lambda e: e[2], lambda e: (e[0].dtype, e[0].device))
        for (owner, dtype, device), js in groups.items():
            layouts = [self._layout(entries[j][1]) for j in js]
            flat = torch.zeros(sum(c * w for c, _, w in layouts), dtype=dtype, device=device)
            offset = 0
            for j, (chunk, rows, width) in zip(js, layouts):
                flat[offset:offset + rows[self.me] * width] = entries[j][0].reshape(-1)
                offset += chunk * width
            received = [torch.empty_like(flat) for _ in range(self.world)] \
                if self.me == owner else None
            self.dist.gather(flat, received, dst=self.global_rank(owner), group=self.group)
            if self.me != owner:
                counters["sent"] += sum(rows[self.me] * width for _, rows, width in layouts)
                continue
            offset = 0
            for j, (chunk, rows, width) in zip(js, layouts):
                shape = entries[j][1]
                out[j] = torch.cat([b[offset:offset + r * width].view(r, *shape[1:])
                                    for b, r in zip(received, rows)])
                counters["received"] += sum(r * width for i, r in enumerate(rows) if i != owner)
                offset += chunk * width
        return out

    def scatter(self, entries: list) -> list:
        """Each rank's rows of whole tensors held by their owners: `entries` are (the whole
        tensor on its owner, None elsewhere; its shape; dtype; device; owner); returns this rank's
        rows of each, views of one received buffer.  One `scatter` per owner and dtype."""
        out: list = [None] * len(entries)
        groups = self._by_owner(entries, lambda e: e[4], lambda e: (e[2], e[3]))
        for (owner, dtype, device), js in groups.items():
            layouts = [self._layout(entries[j][1]) for j in js]
            total = sum(c * w for c, _, w in layouts)
            received = torch.empty(total, dtype=dtype, device=device)
            pieces = None
            if self.me == owner:
                pieces = [torch.zeros(total, dtype=dtype, device=device)
                          for _ in range(self.world)]
                offset = 0
                for j, (chunk, rows, width) in zip(js, layouts):
                    whole = entries[j][0].reshape(-1)
                    for r, piece in enumerate(pieces):
                        piece[offset:offset + rows[r] * width] = \
                            whole[r * chunk * width:(r * chunk + rows[r]) * width]
                    counters["sent"] += sum(r * width for i, r in enumerate(rows) if i != owner)
                    offset += chunk * width
            else:
                counters["received"] += sum(rows[self.me] * width for _, rows, width in layouts)
            self.dist.scatter(received, pieces, src=self.global_rank(owner), group=self.group)
            offset = 0
            for j, (chunk, rows, width) in zip(js, layouts):
                shape = entries[j][1]
                out[j] = received[offset:offset + rows[self.me] * width].view(
                    rows[self.me], *shape[1:])
                offset += chunk * width
        return out

    def broadcast(self, t: torch.Tensor, owner: int) -> torch.Tensor:
        self.dist.broadcast(t, src=self.global_rank(owner), group=self.group)
        if self.me == owner:
            counters["sent"] += t.numel() * (self.world - 1)
        else:
            counters["received"] += t.numel()
        return t

    def all_gather_object(self, obj) -> list:
        found = [None] * self.world
        self.dist.all_gather_object(found, obj, group=self.group)
        return found


def run_on_owners(fn, params, values: dict, hyper: dict) -> dict:
    """A whole-matrix block `fn` (`reads="matrix"`) on a bucket of FSDP2-sharded parameters
    (`is_row_sharded`), each matrix processed whole by one owner rank (`assign_owners`).

    1. Every tensor the block is given for a parameter (the parameter, its gradient, each state
       or handed-on tensor) that is sharded as the parameter is gathered on the owner (one
       `gather` per owner and dtype for the whole bucket: every other rank sends its rows of all
       of that owner's tensors in one buffer); a replicated DTensor is read locally, a
       pending one (`Partial`) is reduced first; plain tensors are taken as they are (replicated:
       the same on every rank).
    2. Each rank runs `fn` once, on the whole tensors of the matrices it owns (not at all if it
       owns none), as a single process would.
    3. The owners tell every rank (one `all_gather_object` of descriptions) what changed:
       inputs written in place (the tensors' version counters say so: the parameter, a state
       tensor) are scattered back into the shards (one `scatter` per owner and dtype for all
       of them and the new sharded results below; a replicated input is broadcast
       back), and each returned value is, per parameter: an input (the shard or tensor it came
       from), a new tensor the parameter's shape (scattered into a new DTensor sharded as the
       parameter: Adafactor's update, SOAP's moments), another tensor (broadcast and kept
       replicated, as a plain tensor on every rank: Adafactor's row and column statistics,
       SOAP's factors and eigenbases), None, or a Python value.

    Not covered: a block that replaces `p.grad` or writes the gradient in place (the change is
    not sent back); a parameter of 2-D meshes (HSDP) or sharded along another dimension (the
    caller runs the block on the DTensors as they are)."""
    from torch.distributed.tensor import DTensor

    from .tensorlist import ParamList, TensorList
    from .blocks.base import PerParam

    tensors, grads = list(params.tensors), list(params.grad.tensors)
    n = len(tensors)
    mesh = tensors[0].device_mesh
    comm = _Comm(mesh)
    loads = _loads.setdefault(id(comm.group), [0] * comm.world)
    owners = assign_owners([tuple(t.shape) for t in tensors], comm.world, loads)
    mine = [i for i in range(n) if owners[i] == comm.me]
    listed = {k: v for k, v in values.items() if isinstance(v, (TensorList, PerParam))}
    # Slots: ("param",), ("grad",) and (key,) per listed value; each element on this rank is
    # gathered (row-sharded), local (any other tensor), or not a tensor.
    slots = {"__param__": tensors, "__grad__": grads}
    slots.update({k: list(v.tensors if isinstance(v, TensorList) else v) for k, v in
                  listed.items()})
    whole: dict[tuple, Any] = {}  # (slot, i) -> the element the owner's block sees
    kinds: dict[tuple, str] = {}
    to_gather: dict[tuple, tuple] = {}  # (slot, i) -> (this rank's rows, shape, owner)
    for i in range(n):
        for slot, elements in slots.items():
            x = elements[i]
            if not isinstance(x, torch.Tensor):
                whole[(slot, i)] = x
                continue
            if distribution_of(x) is not None:
                if is_row_sharded(x) and tuple(x.shape) == tuple(tensors[i].shape):
                    kinds[(slot, i)] = "gathered"
                    to_gather[(slot, i)] = (x.to_local(), tuple(x.shape), owners[i])
                    continue
                if any(p.is_partial() for p in x.placements):
                    x = x.full_tensor()
                else:
                    x = x.to_local()
            kinds[(slot, i)] = "local"
            whole[(slot, i)] = x
    whole.update(zip(to_gather, comm.gather(list(to_gather.values()))))
    # 2. the block, on the matrices this rank owns
    described: dict = {"written": {}, "results": {}, "scalars": {}}
    if mine:
        counters["matrices"] += len(mine)
        versions = {(slot, i): whole[(slot, i)]._version for (slot, i) in kinds if i in mine}
        owned = ParamList([whole[("__param__", i)] for i in mine],
                          [whole[("__grad__", i)] for i in mine])
        given = {}
        for k, v in listed.items():
            elements = [whole[(k, i)] for i in mine]
            given[k] = TensorList(elements) if isinstance(v, TensorList) else PerParam(elements)
        result = fn(owned, **{**values, **given, **hyper})
        result = result if isinstance(result, dict) else {}
        # Under a Python dispatch mode (a profiler's, a FLOP counter: torch 2.13) torch's in-place
        # foreach operations leave `_version` as it was: every tensor is then sent back.
        unversioned = _get_current_dispatch_mode() is not None
        for (slot, i), version in versions.items():
            if unversioned or whole[(slot, i)]._version != version:
                described["written"].setdefault(i, []).append(slot)
        for key, value in result.items():
            if not isinstance(value, (TensorList, PerParam, list, tuple)):
                described["scalars"][key] = value
                continue
            elements = value.tensors if isinstance(value, TensorList) else list(value)
            per = described["results"].setdefault(key, {})
            for j, i in enumerate(mine):
                e = elements[j]
                if e is None or not isinstance(e, torch.Tensor):
                    per[i] = ("value", e)
                    continue
                same = [slot for slot in slots if (slot, i) in kinds and whole[(slot, i)] is e]
                if same:
                    per[i] = ("same", same[0])
                elif tuple(e.shape) == tuple(tensors[i].shape) and \
                        kinds.get(("__param__", i)) == "gathered":
                    per[i] = ("shard", e.dtype)
                    whole[(("result", key), i)] = e
                else:
                    per[i] = ("replicated", tuple(e.shape), e.dtype)
                    whole[(("result", key), i)] = e
    # 3. what changed, back to every rank
    everyone = comm.all_gather_object(described)
    written: dict = {}
    results: dict = {}
    scalars: dict = {}
    for d in everyone:
        written.update(d["written"])
        for key, per in d["results"].items():
            results.setdefault(key, {}).update(per)
        for key, value in d["scalars"].items():
            scalars.setdefault(key, value)
    # Rows to scatter back, all in one `scatter` per owner and dtype: ((what, where), whole on
    # the owner, shape, dtype, device, owner); what is replicated is broadcast as it comes.
    to_scatter: list = []
    for i in range(n):
        for slot in written.get(i, ()):
            target = slots[slot][i]
            local = target.to_local() if distribution_of(target) is not None else target
            if kinds[(slot, i)] == "gathered":
                to_scatter.append((("written", local), whole.get((slot, i)),
                                   tuple(target.shape), local.dtype, local.device, owners[i]))
            else:
                buffer = whole[(slot, i)] if comm.me == owners[i] else torch.empty_like(local)
                comm.broadcast(buffer, owners[i])
                if buffer is not local:
                    local.copy_(buffer)
    made: dict = {key: [None] * n for key in results}
    for key, per in results.items():
        for i in range(n):
            how = per[i]
            if how[0] == "value":
                made[key][i] = how[1]
            elif how[0] == "same":
                made[key][i] = slots[how[1]][i]
            elif how[0] == "shard":
                p = tensors[i]
                to_scatter.append((("result", (key, i)), whole.get((("result", key), i)),
                                   tuple(p.shape), how[1], p.to_local().device, owners[i]))
            else:
                _, shape, dtype = how
                buffer = whole[(("result", key), i)] if comm.me == owners[i] else \
                    torch.empty(shape, dtype=dtype, device=tensors[i].to_local().device)
                made[key][i] = comm.broadcast(buffer.contiguous(), owners[i])
    scattered = comm.scatter([entry[1:] for entry in to_scatter])
    for ((what, where), *_), rows in zip(to_scatter, scattered):
        if what == "written":
            where.copy_(rows)
        else:  # a new tensor sharded as its parameter (its own storage: it is kept as state)
            key, i = where
            p = tensors[i]
            made[key][i] = DTensor.from_local(rows.clone(), p.device_mesh, p.placements,
                                              run_check=False, shape=p.shape, stride=p.stride())
    out = dict(scalars)
    for key, elements in made.items():
        if all(isinstance(e, torch.Tensor) for e in elements):
            out[key] = TensorList(elements)
        else:
            out[key] = PerParam(elements)
    return out
