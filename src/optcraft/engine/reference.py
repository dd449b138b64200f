"""The ``reference`` path: the chain on one parameter at a time, the semantics oracle of the
tests (the other paths are checked against it)."""
from __future__ import annotations

from .buckets import Bucket, make_buckets
from .path import Path


class ReferencePath(Path):
    """One bucket per parameter; blocks run on whole tensors, never on slices."""

    name = "reference"

    def buckets(self, params, state) -> list[Bucket]:
        return make_buckets(params, state, max_params=1)
