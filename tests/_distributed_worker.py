"""What the processes of tests/test_distributed.py run, and the single-process run they are
compared with.

`spawn(scenario, out_dir)` starts a process group of `WORLD` CPU processes (gloo, a TCP store
on 127.0.0.1 that the calling process holds on a port the OS picked), each running the scenario
for every optimizer of `OPTIMIZERS` in turn: the group is made once per scenario, not once per
optimizer.  Each rank writes what it saw to `out_dir/<scenario>-rank<r>.pt`; the test reads those
files and compares them with `train_single`, a plain single-process run on the whole batch.

The scenarios:

* ``ddp``: `DistributedDataParallel`, each rank on its half of the batch;
* ``zero``: DDP with `ZeroRedundancyOptimizer(optimizer_class=<optcraft optimizer>)`, then
  `consolidate_state_dict` and a second run resumed from that checkpoint;
* ``fsdp``: FSDP2 (`fully_shard` on every linear layer and on the model), then a
  `torch.distributed.checkpoint` save and load through `get_optimizer_state_dict` /
  `set_optimizer_state_dict` and a resumed run.
"""
from __future__ import annotations

import copy
import datetime
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import optcraft as oc
from optcraft import distributed as oc_distributed

WORLD = 2
#: Steps before the checkpoint and after it; a whole run is the two together.
STEPS_BEFORE, STEPS_AFTER = 5, 5
STEPS = STEPS_BEFORE + STEPS_AFTER
BATCH = 16  # the global batch; each rank takes BATCH // WORLD rows
DTYPE = torch.float64
TIMEOUT = datetime.timedelta(seconds=120)
#: Rank r's part of a pending-sum DTensor is randn(5) from the seed PARTIAL_SEED + r.
PARTIAL_SEED = 7

#: name -> (constructor, keywords): how ZeroRedundancyOptimizer takes them, `cls(params, **kw)`.
#: Learning rates are chosen so that LARC's and LAMB's trust ratios are not clipped (the norms
#: decide the step), and ranger's k=3 puts a Lookahead synchronisation on both sides of the
#: checkpoint.
@oc.block(state=dict(sqr_sum=oc.blocks.summed))
def grad_sqr_sum(p, **kwargs):
    """Each gradient's sum of squares, summed over every parameter by the engine."""
    return {"sqr_sum": p.grad.map(lambda g: (g * g).sum())}


@oc.block(state=dict(accum=oc.blocks.group(0.0)), reads="all")
def accumulate_sqr_norm(p, sqr_sum, accum=0.0, **kwargs):
    """AdaGrad-Norm's accumulator (Ward, Wu & Bottou, 2019): `b^2 <- b^2 + |g|^2`, |g| the norm
    of every gradient of the model together; kept once per group."""
    return {"accum": accum + sqr_sum}


@oc.block(hypers=dict(eps=1e-10))
def norm_scaled_step(p, lr, accum, eps, **kwargs):
    """`p <- p - lr * g / (b + eps)`."""
    p.sub_(p.grad.div(accum.sqrt() + eps), alpha=lr)


def adagrad_norm(params, lr):
    return oc.Optimizer(params, [grad_sqr_sum, accumulate_sqr_norm, norm_scaled_step], lr=lr)


def _is_matrix(p) -> bool:
    return p.ndim >= 2


def _is_wide_matrix(p) -> bool:
    return p.ndim >= 2 and p.shape[0] > 1


def muon_and_adam(params, muon_lr, adam_lr):
    """`muon_with_adamw`'s routing on groups already split (`SPLIT`): Muon for the matrices, Adam
    for the rest.  Given the groups [matrices, rest], the routed optimizer's groups are the same
    two, in the same order, which ZeroRedundancyOptimizer needs (it pairs its groups with its
    local optimizer's by position).  The rates are not called `lr`: ZeroRedundancyOptimizer
    writes its keyword arguments into every group it hands the local optimizer, and a group's
    `lr` would win over the part's."""
    return oc.route(params, oc.part(oc.Muon, where=_is_matrix, name="muon", lr=muon_lr),
                    oc.part(oc.Adam, name="adamw", lr=adam_lr))


class _Passthrough(TorchDispatchMode):
    """A dispatch mode that changes nothing, as a profiler's or a FLOP counter's does not: under
    one, torch's in-place foreach operations leave a tensor's `_version` as it was (torch 2.13)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def muon_and_adam_in_a_dispatch_mode(params, muon_lr, adam_lr):
    """`muon_and_adam` whose steps run in a dispatch mode (`_Passthrough`): under FSDP2 the
    matrices' owners must still send back what Muon wrote."""
    opt = muon_and_adam(params, muon_lr, adam_lr)
    step = opt.step

    def step_in_a_mode(closure=None):
        with _Passthrough():
            return step(closure)

    opt.step = step_in_a_mode
    return opt


def soap_and_adam(params, soap_lr, adam_lr):
    """SOAP for the matrices of more than one row, with `max_precond_dim=6`, Adam for the rest.

    SOAP's first eigenbasis is `eigh` of the first gradient's Kronecker factors; a factor with a
    repeated eigenvalue (`G^T G` of a 1 x 5 or a 5 x 7 gradient has a null space of dimension 4
    or 2) has eigenvectors that are arbitrary within it, and the gradient summed in another order
    (two ranks) changes them, and Adam in that basis, by O(1): every implementation does that.
    These rules leave SOAP the factors that are not degenerate: 6 x 6 for the 7 x 6 weight, 5 x 5
    for the 5 x 7 one."""
    return oc.route(params, oc.part(oc.SOAP, where=_is_wide_matrix, name="soap", lr=soap_lr,
                                    precondition_frequency=3, max_precond_dim=6),
                    oc.part(oc.Adam, name="adamw", lr=adam_lr))


OPTIMIZERS = {
    "SGD": (oc.SGD, dict(lr=0.05, mom=0.9, wd=0.01)),
    "RMSProp": (oc.RMSProp, dict(lr=0.01, mom=0.9, wd=0.01)),
    "Adam": (oc.Adam, dict(lr=0.01, wd=0.01)),
    "RAdam": (oc.RAdam, dict(lr=0.01, wd=0.01)),
    "QHAdam": (oc.QHAdam, dict(lr=0.01, wd=0.01)),
    "Larc": (oc.Larc, dict(lr=1.0, wd=0.01)),
    "Lamb": (oc.Lamb, dict(lr=0.02, wd=0.01)),
    "ranger": (oc.ranger, dict(lr=0.01, k=3)),
    # schedule progress and group state through ZeRO's and DCP's checkpoints
    "Adam-scheduled": (oc.Adam, dict(lr=oc.schedules.cosine(0.02, 0.002, STEPS), wd=0.01)),
    # a sum over every parameter (exact under FSDP2) kept as group state
    "AdaGradNorm": (adagrad_norm, dict(lr=0.05)),
    # the modern optimizers (issue 21)
    "Lion": (oc.Lion, dict(lr=1e-3, wd=0.1)),
    "ADOPT": (oc.ADOPT, dict(lr=0.01, wd=0.01)),
    "Adan": (oc.Adan, dict(lr=0.01, wd=0.01)),
    "MARS": (oc.MARS, dict(lr=0.01, wd=0.01)),
    "Adagrad": (oc.Adagrad, dict(lr=0.05, wd=0.01)),
    # whole-matrix blocks: Muon on the matrices and Adam on the rest (two groups), Adafactor
    # (factored statistics of the matrices, full ones of the biases), SOAP on two matrices (an
    # eigenbasis refreshed every 3 steps: at steps 4 and 7, on both sides of the checkpoint)
    "Muon+Adam": (muon_and_adam, dict(muon_lr=0.02, adam_lr=0.01)),
    "Muon+Adam-in-a-dispatch-mode": (muon_and_adam_in_a_dispatch_mode,
                                     dict(muon_lr=0.02, adam_lr=0.01)),
    "Adafactor": (oc.Adafactor, dict(lr=0.01)),
    "SOAP+Adam": (soap_and_adam, dict(soap_lr=0.01, adam_lr=0.01)),
    # learning-rate-free: group state (schedule-free's weight sum, Prodigy's d) and, for Prodigy,
    # sums over every parameter
    "AdamWScheduleFree": (oc.AdamWScheduleFree, dict(lr=0.01, wd=0.01)),
    "Prodigy": (oc.Prodigy, dict(lr=1.0, d0=1e-3, wd=0.01)),
    # 8-bit state (issue 21 with the memory issue's codecs), on a wider model (`WIDE`): Adam's
    # moments (a signed and an unsigned code map), Lion's momentum
    "Adam-8bit": (oc.Adam, dict(lr=0.01, wd=0.01, state_bits=8)),
    "Lion-8bit": (oc.Lion, dict(lr=1e-3, wd=0.1, state_bits=8)),
}
#: For debugging: OPTCRAFT_DISTRIBUTED_ONLY="SGD,Muon+Adam" runs only these (the spawned
#: processes inherit the variable).
if os.environ.get("OPTCRAFT_DISTRIBUTED_ONLY"):
    OPTIMIZERS = {k: v for k, v in OPTIMIZERS.items()
                  if k in os.environ["OPTCRAFT_DISTRIBUTED_ONLY"].split(",")}
#: Optimizers given two parameter groups, those their first part takes then the rest (see
#: `param_groups`).
SPLIT = {"Muon+Adam": _is_matrix, "Muon+Adam-in-a-dispatch-mode": _is_matrix,
         "SOAP+Adam": _is_wide_matrix}
#: Optimizers with sums over every parameter: under ZeroRedundancyOptimizer each rank's optimizer
#: holds a partition of the parameters, and `optcraft.distributed.partitioned` makes it add its
#: sums over the ranks (docs/integration.md).
PARTITIONED = {"AdaGradNorm", "Prodigy"}


def make_model(seed: int = 0, name: str | None = None) -> nn.Sequential:
    """The model optimizer `name` trains (`WIDE`, or this one): a small MLP in float64.  Its
    first layer has 7 rows (FSDP2 shards them 4 + 3) and its last one row, so rank 1's shard of
    the last weight and bias is empty."""
    torch.manual_seed(seed)
    if name in WIDE:
        return nn.Sequential(nn.Linear(6, WIDE_ROWS), nn.Tanh(),
                             nn.Linear(WIDE_ROWS, WIDE_COLS), nn.Tanh(),
                             nn.Linear(WIDE_COLS, 1)).to(DTYPE)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(),
                         nn.Linear(5, 1)).to(DTYPE)


#: Optimizers that train a wider MLP: 8-bit state is block-wise quantised only from
#: `state_codecs.MIN_NUMEL` elements (4096), in blocks of 256 elements of the whole flattened
#: tensor.  Its middle weight, 100 x 64 (25 blocks), is sharded 50 + 50 rows on 2 ranks (12.5
#: blocks each: block 12 straddles the ranks) and 25 x 4 on 4 ranks (6.25 blocks each).
WIDE = {"Adam-8bit", "Lion-8bit"}
WIDE_ROWS, WIDE_COLS = 64, 100


def make_data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step (the same on every rank and in the single-process run)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, 6, generator=g, dtype=DTYPE)
    y = torch.randn(BATCH, 1, generator=g, dtype=DTYPE)
    return x, y


def param_groups(name: str, params) -> list:
    """What optimizer `name` is given: the parameters, or for `SPLIT` two groups (the matrices,
    then the rest)."""
    params = list(params)
    if name not in SPLIT:
        return params
    first = SPLIT[name]
    return [{"params": [p for p in params if first(p)]},
            {"params": [p for p in params if not first(p)]}]


def param_names(name: str) -> list[list[str]]:
    """The model's parameter names, group by group, in the order optimizer `name` holds them."""
    named = list(make_model(name=name).named_parameters())
    ids = {id(p): n for n, p in named}
    groups = param_groups(name, [p for _, p in named])
    if not isinstance(groups[0], dict):
        return [[n for n, _ in named]]
    return [[ids[id(p)] for p in g["params"]] for g in groups]


def make_optimizer(name: str, params):
    cls, kwargs = OPTIMIZERS[name]
    return cls(param_groups(name, params), **kwargs)


def _train(model, opt, steps: range, rows: slice = slice(None)):
    for step in steps:
        x, y = make_data(step)
        opt.zero_grad(set_to_none=True)
        # A mean over this rank's rows: DDP and FSDP average the gradients over the ranks, which
        # makes the mean over the whole batch.
        nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        opt.step()


def train_single(name: str, steps: int = STEPS):
    """The single-process run on the whole batch: the parameters after `steps` steps (in
    `model.parameters()` order) and the optimizer's `state_dict()`."""
    model = make_model(name=name)
    opt = make_optimizer(name, model.parameters())
    _train(model, opt, range(steps))
    return [p.detach().clone() for p in model.parameters()], opt.state_dict()


#: The whole-model transforms under FSDP2: the step at which one gradient element is made
#: infinite (in `TRANSFORMED_AT`, a row rank 1 holds), and the global-norm clipping threshold
#: (below the gradients' norm: every step is clipped).
NONFINITE_STEP, TRANSFORMED_AT, MAX_NORM = 2, ("2.weight", (4, 1)), 0.05


def make_transformed(params):
    """AdaGrad-Norm (a sum over every parameter) behind `skip_nonfinite` and
    `clip_by_global_norm`."""
    return oc.Transformed(adagrad_norm(params, lr=0.05),
                          oc.skip_nonfinite(), oc.clip_by_global_norm(MAX_NORM))


def train_transformed(model, opt, rows: slice = slice(None), rank: int | None = None) -> None:
    """`STEPS` steps; at `NONFINITE_STEP` one element of the gradient is made infinite (under
    FSDP2, `rank` is given: the rank whose shard holds that element sets it)."""
    name, (row, col) = TRANSFORMED_AT
    for step in range(STEPS):
        x, y = make_data(step)
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        if step == NONFINITE_STEP:
            grad = dict(getattr(model, "module", model).named_parameters())[name].grad  # (DDP's)
            if rank is None:
                grad[row, col] = float("inf")
            else:
                local = grad.to_local()
                chunk = -(-grad.shape[0] // WORLD)
                if rank * chunk <= row < rank * chunk + local.shape[0]:
                    local[row - rank * chunk, col] = float("inf")
        opt.step()


def single_transformed() -> dict:
    model = make_model()
    opt = make_transformed(model.parameters())
    train_transformed(model, opt)
    return {"params": [p.detach().clone() for p in model.parameters()],
            "skips": opt.transforms[0].skips}


# ---- in the spawned processes -------------------------------------------------------------------

def _rows(rank: int, world: int = WORLD) -> slice:
    n = BATCH // world
    return slice(rank * n, (rank + 1) * n)


def _full(params) -> list[torch.Tensor]:
    """Every parameter whole (a DTensor gathered from its shards), detached, on the CPU."""
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone().cpu()
            for p in params]


def _ddp(rank: int, out_dir: Path) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    result = {}
    for name in OPTIMIZERS:
        model = DDP(make_model(name=name))
        opt = make_optimizer(name, model.parameters())
        _train(model, opt, range(STEPS), _rows(rank))
        result[name] = _full(model.parameters())
    return result


def _zero(rank: int, out_dir: Path) -> dict:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    # The whole-model transforms around ZeRO (every rank holds every gradient under DDP), over
    # AdaGrad-Norm (a sum over every parameter) built by `partitioned`.
    model = DDP(make_model())
    opt = oc.Transformed(
        ZeroRedundancyOptimizer(model.parameters(),
                                optimizer_class=oc_distributed.partitioned(adagrad_norm),
                                lr=0.05),
        oc.skip_nonfinite(), oc.clip_by_global_norm(MAX_NORM))
    train_transformed(model, opt, _rows(rank))
    result = {"transformed": {"params": _full(model.parameters()),
                              "skips": opt.transforms[0].skips}}
    for name in OPTIMIZERS:
        cls, kwargs = OPTIMIZERS[name]
        if name in PARTITIONED:
            cls = oc_distributed.partitioned(cls)
        model = DDP(make_model(name=name))
        opt = ZeroRedundancyOptimizer(param_groups(name, model.parameters()),
                                      optimizer_class=cls, **kwargs)
        _train(model, opt, range(STEPS_BEFORE), _rows(rank))
        opt.consolidate_state_dict(to=0)
        checkpoint = out_dir / f"zero-{name}.pt"
        if rank == 0:
            torch.save({"model": model.module.state_dict(), "optimizer": opt.state_dict()},
                       checkpoint)
        dist.barrier()
        _train(model, opt, range(STEPS_BEFORE, STEPS), _rows(rank))
        uninterrupted = _full(model.parameters())

        # A new model and optimizer (from another seed), resumed from the checkpoint: every rank
        # loads the whole consolidated state and keeps its own partition of it.
        saved = torch.load(checkpoint, weights_only=True)
        resumed_model = make_model(seed=1, name=name)
        resumed_model.load_state_dict(saved["model"])
        resumed_model = DDP(resumed_model)
        resumed = ZeroRedundancyOptimizer(param_groups(name, resumed_model.parameters()),
                                          optimizer_class=cls, **kwargs)
        resumed.load_state_dict(saved["optimizer"])
        _train(resumed_model, resumed, range(STEPS_BEFORE, STEPS), _rows(rank))
        result[name] = {"uninterrupted": uninterrupted,
                        "resumed": _full(resumed_model.parameters()),
                        # read again: ZeRO's load_state_dict keeps the loaded tensors as its
                        # state (no copy), so the run above has moved `saved`'s on
                        "checkpoint": torch.load(checkpoint, weights_only=True)["optimizer"]
                        if rank == 0 else None}
    return result


def _sharded_model(seed: int = 0, name: str | None = None) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = make_model(seed, name)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def _sums_in_rank_order(rank: int, mesh) -> dict:
    """`sum_over_ranks` on two pending sums (`Partial` DTensors: rank r holds `partial_values`),
    given in a different order on each rank, as a chain's set of names can come in any order (a
    set's order changes with the process's hash seed)."""
    from torch.distributed.tensor import DTensor, Partial

    values = partial_values(rank)
    sums = {name: [oc.TensorList([DTensor.from_local(v, mesh, [Partial()]) for v in vs])]
            for name, vs in values.items()}
    if rank % 2:
        sums = dict(reversed(sums.items()))
    return {k: v.clone() for k, v in oc_distributed.sum_over_ranks(sums).items()}


def partial_values(rank: int) -> dict:
    """Rank `rank`'s parts of two sums over every parameter, `a` and `b`, of three tensors each."""
    g = torch.Generator().manual_seed(PARTIAL_SEED + 100 + rank)
    return {name: list(torch.randn(3, generator=g, dtype=DTYPE).unbind(0)) for name in "ab"}


#: torch's fused optimizer kernels (what the `fused` path calls).
FUSED_KERNELS = ("_fused_adam_", "_fused_adamw_", "_fused_sgd_", "_fused_adagrad_")


def _counting(kernel, counts: dict):
    """`kernel`, counting in `counts` the parameters it is given and how many are DTensors."""
    from torch.distributed.tensor import DTensor

    def counted(params, *args, **kwargs):
        counts["tensors"] += len(params)
        counts["dtensors"] += sum(isinstance(p, DTensor) for p in params)
        return kernel(params, *args, **kwargs)
    return counted


def _fsdp(rank: int, out_dir: Path) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
        set_optimizer_state_dict)

    # The per-tensor reductions LARC and LAMB use, on DTensors: they must be those of the whole
    # parameter and gradient, not of this rank's shard.
    model = _sharded_model()
    x, y = make_data(0)
    nn.functional.mse_loss(model(x[_rows(rank)]), y[_rows(rank)]).backward()
    params = oc.ParamList(model.parameters())
    # Lists a sharded model does not make: a pending sum (each rank holds a part of the values)
    # and a replicated tensor beside a sharded one.
    from torch.distributed.tensor import DTensor, Partial, Replicate

    mesh = params[0].device_mesh
    part = torch.randn(5, generator=torch.Generator().manual_seed(PARTIAL_SEED + rank),
                       dtype=DTYPE)
    mixed = oc.TensorList([params[0], DTensor.from_local(torch.arange(3.0, dtype=DTYPE), mesh,
                                                         [Replicate()]),
                           DTensor.from_local(part, mesh, [Partial()])])
    result = {"reductions": {"shards": [tuple(p.to_local().shape) for p in params],
                             "norm": _full(params.norm()), "rms": _full(params.rms()),
                             "grad_norm": _full(params.grad.norm()),
                             "grad_rms": _full(params.grad.rms()),
                             "norm_1": _full(params.norm(1)),
                             "norm_inf": _full(params.norm(float("inf"))),
                             "mixed_norm": _full(mixed.norm())},
              "sums": _sums_in_rank_order(rank, mesh)}
    # skip_nonfinite and clip_by_global_norm see every gradient: on shards, the decision to skip
    # and the norm must be those of the whole model (and the same on every rank).
    model = _sharded_model()
    opt = make_transformed(model.parameters())
    train_transformed(model, opt, _rows(rank), rank)
    result["transformed"] = {"params": _full(model.parameters()),
                             "skips": opt.transforms[0].skips}

    # 4-bit state of a sharded parameter is refused (two codes share a byte), before any change.
    model = _sharded_model(name="Adam-8bit")
    opt = oc.Adam(model.parameters(), lr=0.01, state_bits=4)
    before = _full(model.parameters())
    x, y = make_data(0)
    nn.functional.mse_loss(model(x[_rows(rank)]), y[_rows(rank)]).backward()
    try:
        opt.step()
        result["four_bits"] = None
    except ValueError as error:
        result["four_bits"] = {"error": str(error), "unchanged": all(
            torch.equal(a, b) for a, b in zip(_full(model.parameters()), before)),
            "state": sum(len(st) for st in opt.state.values())}

    # Whole-matrix blocks run each matrix on one owner rank: count what each rank orthogonalises.
    import optcraft.blocks.matrix as matrix_blocks

    orthogonalised = []
    newton_schulz = matrix_blocks.newton_schulz

    def counting_newton_schulz(matrices, *args, **kwargs):
        orthogonalised.append([tuple(m.shape) for m in matrices])
        return newton_schulz(matrices, *args, **kwargs)
    matrix_blocks.newton_schulz = counting_newton_schulz
    # torch's fused kernels run on the local shards: count the tensors they are given, and
    # those that are DTensors (the kernels have no DTensor rule).
    fused = {"tensors": 0, "dtensors": 0}
    for kernel in FUSED_KERNELS:
        setattr(torch, kernel, _counting(getattr(torch, kernel), fused))
    for name in OPTIMIZERS:
        model = _sharded_model(name=name)
        opt = make_optimizer(name, model.parameters())
        orthogonalised.clear()
        oc_distributed.reset_counters()
        fused.update(tensors=0, dtensors=0)
        _train(model, opt, range(STEPS_BEFORE), _rows(rank))
        work = {"newton_schulz": list(orthogonalised), **oc_distributed.counters,
                "fused": dict(fused)}

        checkpoint = out_dir / f"fsdp-{name}"
        dcp.save({"model": get_model_state_dict(model),
                  "optimizer": get_optimizer_state_dict(model, opt)}, checkpoint_id=checkpoint)
        # The whole optimizer state (every tensor gathered), to compare with the single process.
        whole = get_optimizer_state_dict(model, opt, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        # (copied: a replicated, plain tensor of the state, such as Adafactor's row statistics
        # under FSDP2, is in that dict as it is, and the steps below change it in place)
        whole = copy.deepcopy(whole)
        _train(model, opt, range(STEPS_BEFORE, STEPS), _rows(rank))
        uninterrupted = _full(model.parameters())

        resumed_model = _sharded_model(seed=1, name=name)
        resumed = make_optimizer(name, resumed_model.parameters())
        loaded = {"model": get_model_state_dict(resumed_model),
                  "optimizer": get_optimizer_state_dict(resumed_model, resumed)}
        dcp.load(loaded, checkpoint_id=checkpoint)
        set_model_state_dict(resumed_model, loaded["model"])
        set_optimizer_state_dict(resumed_model, resumed, loaded["optimizer"])
        _train(resumed_model, resumed, range(STEPS_BEFORE, STEPS), _rows(rank))
        result[name] = {"uninterrupted": uninterrupted,
                        "resumed": _full(resumed_model.parameters()),
                        "state": whole if rank == 0 else None, "work": work}
    return result


#: Resharded: the optimizers whose FSDP2 checkpoints (saved on `WORLD` ranks) are loaded on 4
#: ranks (on 1 rank, all of them): group state (AdaGrad-Norm's accumulator, schedule-free's
#: weight sum, Prodigy's d and running sums), the whole-matrix blocks, whose owners and
#: replicated state change, and 8-bit state (its blocks straddle other shard boundaries).
RESHARDED_ON_4 = ["AdaGradNorm", "Muon+Adam", "Adafactor", "SOAP+Adam", "AdamWScheduleFree",
                  "Prodigy", "Adam-8bit"]


def _resharded(rank: int, out_dir: Path) -> dict:
    """Each FSDP2 checkpoint of the ``fsdp`` scenario (`out_dir/fsdp-<name>`, saved on `WORLD`
    ranks after `STEPS_BEFORE` steps) loaded on this process group's ranks, and the run
    continued to `STEPS`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
        set_optimizer_state_dict)

    world = dist.get_world_size()
    names = list(OPTIMIZERS)
    if world != 1:
        names = [n for n in names if n in RESHARDED_ON_4]
    result = {}
    for name in names:
        model = _sharded_model(seed=1, name=name)
        opt = make_optimizer(name, model.parameters())
        loaded = {"model": get_model_state_dict(model),
                  "optimizer": get_optimizer_state_dict(model, opt)}
        dcp.load(loaded, checkpoint_id=out_dir / f"fsdp-{name}")
        set_model_state_dict(model, loaded["model"])
        set_optimizer_state_dict(model, opt, loaded["optimizer"])
        _train(model, opt, range(STEPS_BEFORE, STEPS), _rows(rank, world))
        result[name] = _full(model.parameters())
    return result


SCENARIOS = {"ddp": _ddp, "zero": _zero, "fsdp": _fsdp, "resharded": _resharded}


def _run(rank: int, scenario: str, port: int, out_dir: str, world: int = WORLD) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world + 1, is_master=False, timeout=TIMEOUT)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        result = SCENARIOS[scenario](rank, Path(out_dir))
        torch.save(result, Path(out_dir) / f"{scenario}-{world}-rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Done, and the result saved: leave without the interpreter's teardown. A gloo worker thread
    # releases a collective's work a moment after the rank has seen it finish, and releasing the
    # last ones' tensors needs the interpreter: reached during its teardown, the thread is killed
    # and the process aborts ("terminate called without an active exception"; see
    # docs/integration.md, the torchrun example).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(scenario: str, out_dir: Path, world: int = WORLD) -> list:
    """Run `scenario` on `world` processes; return each rank's result."""
    if sys.platform.startswith("linux"):
        # gloo finds its network interface from the host name unless told; the loopback one is
        # always there.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # The store's server lives here, on a port the OS picked: no race for a free port.  The
    # workers and this process are its world + 1 clients.
    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, timeout=TIMEOUT,
                          wait_for_workers=False)
    mp.start_processes(_run, args=(scenario, store.port, str(out_dir), world), nprocs=world,
                       join=True, start_method="spawn")
    del store
    return [torch.load(Path(out_dir) / f"{scenario}-{world}-rank{r}.pt", weights_only=True)
            for r in range(world)]
