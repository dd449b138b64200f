"""The interface every execution path implements (one class per path, one module each)."""
from __future__ import annotations

import torch

from ..state_codecs import StateCodec
from ..tensorlist import ParamList
from .buckets import Bucket, make_buckets
from .chain import Chain, Stage, apply


class Path:
    """How a chain runs over a group's parameters.

    `buckets(params, state)` splits the parameters that have a gradient into the pieces this path
    runs together; `run(stage, bucket, params, values, hyper)` runs a stage of the chain on one of
    them and returns the values after it (`params`: the bucket's parameters as the chain sees them,
    real views or float32 masters; `values`: its state and the group's values, gathered).  The
    engine (`optcraft.engine.step`) does the rest, the same for every path: master weights,
    complex views, writing the state back, the stages of a chain and the values summed over all
    parameters.  This base class is the foreach path's behaviour without its slicing."""

    name = "base"
    #: the foreach path runs blocks that read elements on slices of this many elements
    slice_numel: int | None = None

    def __init__(self, chain: Chain):
        self.chain = chain

    def begin_step(self) -> None:
        """Called once before each optimizer step."""

    def buckets(self, params, state) -> list[Bucket]:
        return make_buckets(params, state)

    def run(self, stage: Stage, bucket: Bucket, params: ParamList, values: dict,
            hyper: dict) -> dict:
        return apply(stage.cbs, params, values, hyper, self.slice_numel)

    def decode(self, codec: StateCodec, values: dict, bucket: Bucket, dtype: torch.dtype) -> dict:
        """The bucket's gathered state `values` as `run` takes it: decoded by `codec`
        (`optcraft.state_codecs`) to `dtype`.  A path that decodes in its own compiled step
        keeps the entries it decodes there encoded; `run` then hands them back encoded."""
        return codec.decode(values, bucket.params, dtype, self.chain.kept)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.chain!r})"
