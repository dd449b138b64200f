"""Buckets: the parameters of a group that share one vectorised call.

Same device, same dtype, the same DTensor layout (FSDP2's sharded parameters), the same state
keys, and the same non-tensor state values (`step`, `do_wd`, ...), so that a per-parameter flag
such as `do_wd=False` is honoured without splitting the user's groups.  A complex parameter runs
as its real view (`as_real`).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from ..blocks.base import PerParam
from ..distributed import distribution_of
from ..tensorlist import TensorList


class Bucket:
    """Parameters of one group that run together, with their state gathered as lists."""

    __slots__ = ("params", "grads", "tensor_keys", "scalars")

    def __init__(self, params, grads, tensor_keys, scalars):
        self.params, self.grads = params, grads
        self.tensor_keys, self.scalars = tensor_keys, scalars

    def with_params(self, params: list) -> "Bucket":
        """A bucket of some of these parameters (with their gradients), the same state layout."""
        grad_of = {id(p): g for p, g in zip(self.params, self.grads)}
        return Bucket(params, [grad_of[id(p)] for p in params], self.tensor_keys, self.scalars)

    # Both look each parameter's state up once: a tensor's hash is a Python call, and with 2,000
    # small tensors those lookups were a sizeable part of a step.  A bucket holds one dtype, so
    # whether it is complex is asked of its first parameter.
    def gather(self, state) -> dict[str, Any]:
        """The bucket's state as the blocks take it, as it is now (an earlier stage of the chain
        may have changed it since the bucket was made): a `TensorList` per tensor entry, other
        values (the same for every parameter of a bucket) as they are."""
        complex_ = self.params[0].is_complex()
        states = [state[p] for p in self.params]
        found = {}
        for k, v in states[0].items():
            if isinstance(v, torch.Tensor):
                found[k] = TensorList([as_real(st[k]) if complex_ else st[k] for st in states])
            else:
                found[k] = v
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


def _freeze(value):
    try:
        hash(value)
        return value
    except TypeError:
        return ("<unhashable>", id(value))


def chunks(items: list, max_numel: int | None, size=lambda t: t.numel()) -> list[list]:
    """`items` in consecutive chunks of at most `max_numel` elements (an item larger than that is
    a chunk of its own)."""
    if max_numel is None:
        return [items]
    found, current, total = [], [], 0
    for item in items:
        if current and total + size(item) > max_numel:
            found.append(current)
            current, total = [], 0
        current.append(item)
        total += size(item)
    return found + [current] if current else found


def make_buckets(params, state, max_params: int | None = None,
                 max_numel: int | None = None) -> list[Bucket]:
    """Split the parameters that have a gradient into buckets (see the module docstring).

    `max_params=1` gives one bucket per parameter (the reference path); `max_numel` bounds the
    elements of a bucket (a parameter bigger than that is a bucket of its own).
    """
    keyed: dict[tuple, list] = defaultdict(list)
    for p in params:
        if p.grad is None:
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
    for (_, _, _, tensor_keys, _), found in keyed.items():
        st = state.get(found[0]) or {}
        scalars = {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)}
        step = max_params or len(found)
        for i in range(0, len(found), step):
            for chunk in chunks(found[i:i + step], max_numel):
                buckets.append(Bucket(chunk, [p.grad for p in chunk], tensor_keys, scalars))
    return buckets
