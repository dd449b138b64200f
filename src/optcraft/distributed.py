"""Collectives for sharded parameters (FSDP2's DTensors): what a block needs of a whole tensor,
computed from the shards each rank holds.

`tensorlist` asks `distribution_of` whether a tensor is sharded and hands its norms to
`sharded_norms`; nothing else in optcraft talks to `torch.distributed` during a step.
"""
from __future__ import annotations

import math

import torch


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
    if power == 2:
        local = local.sqrt()
    elif power is not None:
        local = local.pow(1 / power)
    replicated = [Replicate()] * mesh.ndim
    return [DTensor.from_local(n, mesh, replicated, run_check=False) for n in local.unbind(0)]


def sum_over_ranks(values: list):
    """The sum of per-bucket contributions (numbers, 0-d tensors, or lists of 0-d tensors, one per
    tensor) to a value summed over every parameter, as one number or 0-d tensor.  A contribution
    computed from FSDP2's sharded tensors is a DTensor whose value is pending across ranks: its
    `full_tensor()` is the sum over the whole tensors (one all-reduce)."""
    total = 0.0
    for value in values:
        items = value.tensors if hasattr(value, "tensors") else \
            value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if distribution_of(item) is not None:
                item = item.full_tensor()
            if isinstance(item, torch.Tensor) and isinstance(total, torch.Tensor) and \
                    item.device != total.device:
                item = item.to(total.device)
            total = total + item
    return total
