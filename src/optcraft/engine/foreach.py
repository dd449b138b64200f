"""The ``foreach`` path: every block over a whole bucket at once, each `TensorList` operation one
`torch._foreach_*` call."""
from __future__ import annotations

from .buckets import Bucket, make_buckets
from .chain import SLICE_NUMEL
from .path import Path

#: The foreach path's buckets hold at most this many elements, or the largest parameter when
#: that is bigger: the temporaries a block makes (Adam's denominator, LAMB's update) then never
#: span the whole model, while small tensors still share one foreach call.
MIN_CHUNK_NUMEL = 1 << 20


class ForeachPath(Path):
    """Buckets of at most `MIN_CHUNK_NUMEL` elements (or the largest parameter); on a CPU, blocks
    that read elements run on slices of `chain.SLICE_NUMEL` elements (see `chain.apply`)."""

    name = "foreach"
    slice_numel = SLICE_NUMEL

    def buckets(self, params, state) -> list[Bucket]:
        params = list(params)
        max_numel = max([MIN_CHUNK_NUMEL] + [p.numel() for p in params])
        return make_buckets(params, state, max_numel=max_numel)
