"""Execution: how a chain of blocks runs over an optimizer's parameter groups.

No algorithm knows which path runs it.  `step` splits each group's parameters (those with a
gradient) into buckets (`buckets`) and runs the chain (`chain.Chain`) on each with one of the
paths, one class each behind one interface (`path.Path`):

* ``reference`` (`reference.ReferencePath`): one parameter at a time, the semantics oracle of
  the tests;
* ``foreach`` (`foreach.ForeachPath`): every bucket at once through `TensorList`
  (torch._foreach_* kernels);
* ``fused`` (`fused.FusedPath`): torch's own kernel where the chain is exactly one of them;
* ``compiled`` (`compiled.CompiledPath`): the chain traced and compiled by inductor;
* ``auto``: ``fused`` where the chain is one of torch's kernels, else ``foreach``.

What every path shares is here: float32 master copies of half-precision parameters, real views of
complex ones, writing the state back, the stages of a chain (a block that reads every parameter at
once runs between them, once per group, on values summed over every parameter), and the group's
own state (`group["group_state"]`).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from .. import precision
from ..blocks.base import vectorised
from ..distributed import begin_step as begin_distributed_step, sum_over_ranks
from ..state_codecs import StateCodec, decoded, write_stochastic
from ..tensorlist import ParamList, TensorList
from .buckets import Bucket, as_real, make_buckets
from .chain import Chain, Stage
from .compiled import CompiledPath
from .foreach import ForeachPath
from .fused import FusedPath, recognise
from .path import Path
from .reference import ReferencePath

IMPLS = ("auto", "reference", "foreach", "fused", "compiled")
PATHS: dict[str, type[Path]] = {"reference": ReferencePath, "foreach": ForeachPath,
                                "fused": FusedPath, "compiled": CompiledPath}
#: Group keys that are not hyperparameters: the parameters, their names, the chain a routed
#: group runs, and the state kept per group (see `blocks.base.group`).
GROUP_STATE = "group_state"
HIDDEN_GROUP_KEYS = ("params", "param_names", "chain", GROUP_STATE)

__all__ = ["IMPLS", "PATHS", "Chain", "Path", "check_impl", "resolve", "path_for", "step",
           "hypers_of", "HIDDEN_GROUP_KEYS", "GROUP_STATE", "group_state_of"]


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    return impl


def resolve(impl: str, chain: Chain) -> str:
    """The path `impl` runs `chain` on: "auto" is "fused" where torch has a kernel for the chain,
    else "foreach"; "fused" for a chain torch has no kernel for is an error."""
    if impl == "auto":
        return "fused" if recognise(chain) is not None else "foreach"
    if impl == "fused":
        FusedPath(chain)  # raises, naming the chain, where torch has no kernel for it
    return impl


def path_for(impl: str, chain: Chain) -> Path:
    """The path object that runs `chain` for `impl` (resolved)."""
    return PATHS[resolve(impl, chain)](chain)


def hypers_of(group: dict) -> dict[str, Any]:
    return {k: v for k, v in dict.items(group) if k not in HIDDEN_GROUP_KEYS}


def group_state_of(group: dict, chain: Chain) -> dict:
    """The group's own state (what the chain's blocks keep per group), made with its defaults."""
    found = group.get(GROUP_STATE)
    if found is None:
        found = group[GROUP_STATE] = {}
    for name, rule in chain.group_state.items():
        found.setdefault(name, rule.default)
    return found


def _plain_scalars(hyper: dict) -> dict:
    """The hyperparameters as the blocks take them: a one-element tensor (a tensor lr, of any
    shape, as torch takes it) stays a tensor, as a 0-d one, so that a step never reads its value
    back from the device (no `.item()`) and a compiled step sees new values as new data."""
    out = {}
    for k, v in hyper.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1 and v.dim() > 0:
            v = v.reshape(())
        out[k] = v
    return out


def _plan(chain: Chain, path: Path, groups: list, state) -> list:
    """The host's part of a step before any arithmetic: each group's hyperparameters, values and
    buckets."""
    path.begin_step()
    begin_distributed_step()  # owners of whole-matrix blocks are balanced over the step
    plan = []
    for group in groups:
        hyper = _plain_scalars(hypers_of(group))
        values = dict(group_state_of(group, chain)) if chain.group_state or \
            GROUP_STATE in group else {}
        plan.append((group, hyper, values, path.buckets(group["params"], state)))
    return plan


#: State kept as the chain makes it (float32 state, no stochastic rounding).
_AS_MADE = StateCodec(32, "nearest")


def step(chain: Chain, path: Path, groups: Iterable[dict], state,
         master_weights: bool = True, codec: StateCodec | None = None,
         partition_group=None) -> None:
    """One optimizer step of `chain` over `groups` on `path`, its state stored by `codec`
    (`optcraft.state_codecs`; None: as the chain makes it).  `partition_group`: the process
    group whose ranks hold the other parameters (ZeroRedundancyOptimizer's partitions: see
    `optcraft.distributed.partitioned`), over which sums over every parameter are also taken."""
    plan = _plan(chain, path, list(groups), state)
    for i, stage in enumerate(chain.stages):
        if i > 0:
            # The stage before made state: parameters whose state now differs (a tensor stored
            # quantised beside one kept in float32) no longer share a bucket.
            plan = [(group, hyper, values, path.buckets(group["params"], state))
                    for group, hyper, values, _ in plan]
        sums: dict[str, list] = {}
        for group, hyper, values, buckets in plan:
            for bucket in buckets:
                run_bucket(path, stage, bucket, state, values, hyper, master_weights, sums,
                           codec)
        if stage.all_block is not None:
            _all_block_stage(chain, stage, plan, sums, state, partition_group)


def _all_block_stage(chain: Chain, stage: Stage, plan: list, sums: dict, state,
                     partition_group=None) -> None:
    totals = sum_over_ranks(sums, chain.summed, partition_group)
    for group, hyper, values, buckets in plan:
        _run_all_block(chain, stage.all_block, group, hyper, values, totals, state)


def run_bucket(path: Path, stage: Stage, bucket: Bucket, state, group_values: dict, hyper: dict,
               master_weights: bool, sums: dict, codec: StateCodec | None = None) -> None:
    """A stage of the chain on one bucket, and the new state written back.  Half-precision
    parameters run on their float32 master copies (see `optcraft.precision`), or, without them
    and with stochastic rounding, on float32 copies rounded back stochastically (see
    `optcraft.state_codecs`); complex ones as their real views.  The stored state is decoded
    before the chain and encoded after it by `codec`; what the chain hands on (`transient`) is
    dropped, and what it sums over all parameters (`summed`) is added to `sums`."""
    codec = codec or _AS_MADE
    masters, params, values = _bucket_inputs(path, bucket, state, group_values, master_weights,
                                             codec)
    values = path.run(stage, bucket, params, values, hyper)
    _bucket_outputs(path, bucket, state, group_values, values, sums, masters, master_weights,
                    codec)


def _bucket_inputs(path: Path, bucket: Bucket, state, group_values: dict, master_weights: bool,
                   codec: StateCodec):
    masters = None
    with_master = precision.uses_master(bucket.params[0].dtype, master_weights)
    if with_master or codec.stochastic_params(bucket.params[0].dtype, with_master):
        masters = precision.masters_of(bucket.params, state) if with_master else \
            precision.upcast(bucket.params)
        params = ParamList(masters, precision.upcast(bucket.grads))
    elif bucket.params[0].is_complex():  # (a bucket holds one dtype)
        params = ParamList([as_real(p) for p in bucket.params],
                           [as_real(g) for g in bucket.grads])
    else:
        params = ParamList(bucket.params, bucket.grads)
    values = {**group_values, **bucket.gather(state)}
    values.pop(precision.MASTER, None)
    values = path.decode(codec, values, bucket, params.tensors[0].dtype)
    return masters, params, values


def _bucket_outputs(path: Path, bucket: Bucket, state, group_values: dict, values: dict,
                    sums: dict, masters, master_weights: bool, codec: StateCodec) -> None:
    values.pop(precision.MASTER, None)
    for name in group_values:
        values.pop(name, None)
    for name in path.chain.transient:
        values.pop(name, None)
    for name in path.chain.summed:
        value = values.pop(name, None)
        if value is not None:
            sums.setdefault(name, []).append(value)
    _unalias_new_state(bucket, values)
    with_master = precision.uses_master(bucket.params[0].dtype, master_weights)
    values = codec.encode(values, bucket.params, state, path.chain.kept,
                          None if with_master else bucket.params[0].dtype)
    bucket.scatter(state, values)
    if masters is not None and with_master:
        precision.write_back(bucket.params, masters)
    elif masters is not None:
        write_stochastic(bucket.params, masters)


def _unalias_new_state(bucket: Bucket, values: dict) -> None:
    """State made at this step that is a gradient or a parameter itself gets its own memory:
    a compiled chain (inductor) may return an input as an output equal to it (SGD's first
    momentum buffer, `0 * mom + g`, is the gradient), and `zero_grad` would then zero it."""
    new = [k for k, v in values.items()
           if isinstance(v, TensorList) and k not in bucket.tensor_keys]
    if not new:  # (every step but the first)
        return
    inputs = {t.data_ptr() for t in (*bucket.grads, *bucket.params)}
    for key in new:
        value = values[key]
        # (a TensorList may hold None for the tensors an entry is not kept for: Adafactor's)
        if any(t is not None and t.data_ptr() in inputs for t in value.tensors):
            values[key] = TensorList([t.clone() if t is not None and t.data_ptr() in inputs
                                      else t for t in value.tensors])


def _run_all_block(chain: Chain, cb, group: dict, hyper: dict, values: dict, totals: dict,
                   state) -> None:
    """A block that reads every parameter at once, for one group: it gets the values summed over
    every parameter, the group's state and its hyperparameters; what it returns under the names
    of group state is kept in the group, the rest goes to the group's later stages."""
    params = [p for p in group["params"] if p.grad is not None]
    result = vectorised(cb)(ParamList(params, [p.grad for p in params]),
                            **{**values, **totals, **hyper}) or {}
    kept = group_state_of(group, chain)
    for name, value in result.items():
        if name in chain.group_state:
            kept[name] = value
        values[name] = value


def move_to_point(move, p: torch.Tensor, st: dict, values: dict, master_weights: bool,
                  rules: dict | None = None) -> None:
    """`move(params, **state_and_values)`, a block's `eval_point` function, on one parameter (its
    float32 master where it has one, else its real view), then the master rounded back in.  The
    state it reads is decoded (`rules`: the chain's kept state, see `optcraft.state_codecs`)."""
    with_master = precision.uses_master(p.dtype, master_weights) and precision.MASTER in st
    target = st[precision.MASTER] if with_master else as_real(p)
    if not p.is_complex():
        st = decoded(st, p, target.dtype, rules or {})
    own = {k: TensorList([as_real(v)]) if isinstance(v, torch.Tensor) else v
           for k, v in st.items() if k != precision.MASTER}
    move(ParamList([target], [None]), **{**values, **own})
    if with_master:
        precision.write_back([p], [target])
