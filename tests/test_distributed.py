"""optcraft under torch.distributed (issue 7, 3-5): DDP, ZeroRedundancyOptimizer and FSDP2.

Two CPU processes (gloo, 127.0.0.1) run each scenario of `_distributed_worker` once, every
optimizer in turn; each rank trains on its half of a global batch.  The expected values come from
an independent run: the same optimizer in this process, on one unsharded model and the whole
batch (`train_single`), in float64, so the only differences are those of summing the gradient in
another order.  Checkpoints are checked twice: their content against the single-process
optimizer's `state_dict()` at the same step, and a run resumed from them against the
uninterrupted run.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import _distributed_worker as worker

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="this torch build has no torch.distributed with the gloo backend"),
]

NAMES = list(worker.OPTIMIZERS)
#: float64, a few steps: the distributed runs differ from the single process by rounding only.
CLOSE = dict(rtol=1e-12, atol=1e-14)
#: SOAP's eigenbases (eigh, then QR) amplify the rounding of the gradient's sum.
TOLERANCE = {"SOAP+Adam": dict(rtol=1e-9, atol=1e-12)}


def close(name: str) -> dict:
    return TOLERANCE.get(name, CLOSE)


def _fsdp2_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def single():
    """Per optimizer: the parameters after the whole run, and the state dict at the checkpoint."""
    found = {}
    for name in NAMES:
        params, _ = worker.train_single(name, worker.STEPS)
        _, state_dict = worker.train_single(name, worker.STEPS_BEFORE)
        found[name] = {"params": params, "checkpoint": state_dict}
    return found


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return worker.spawn("ddp", tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def zero(tmp_path_factory):
    return worker.spawn("zero", tmp_path_factory.mktemp("zero"))


@pytest.fixture(scope="module")
def fsdp_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp")


@pytest.fixture(scope="module")
def fsdp(fsdp_dir):
    if not _fsdp2_available():
        pytest.skip("this torch has no torch.distributed.fsdp.fully_shard (FSDP2, torch >= 2.6)")
    return worker.spawn("fsdp", fsdp_dir)


@pytest.fixture(scope="module", params=[1, 4], ids=["on1", "on4"])
def resharded(request, fsdp, fsdp_dir):
    """The ``fsdp`` scenario's checkpoints (saved on 2 ranks) resumed on 1 and on 4 ranks."""
    return request.param, worker.spawn("resharded", fsdp_dir, world=request.param)


def _assert_params_close(actual, expected, model: str | None = None, **tolerance):
    """The parameters of optimizer `model`'s model (`worker.make_model`)."""
    assert len(actual) == len(expected)
    names = [n for n, _ in worker.make_model(name=model).named_parameters()]
    for name, a, e in zip(names, actual, expected):
        torch.testing.assert_close(a, e, msg=lambda m: f"{name}: {m}", **tolerance)


def _assert_params_equal(actual, expected, model: str | None = None):
    _assert_params_close(actual, expected, model, rtol=0, atol=0)


def _assert_state_matches(saved_state: dict, expected_state: dict, keys: list, **tolerance):
    """`saved_state[keys[i]]` is the single-process `expected_state[i]`: the same entries, the
    same values."""
    assert len(saved_state) == len(expected_state)
    for index, key in enumerate(keys):
        got, want = saved_state[key], expected_state[index]
        assert set(got) == set(want), f"{key}: {sorted(got)} != {sorted(want)}"
        for entry, value in want.items():
            found = got[entry]
            if isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and \
                    found.shape != value.shape:
                # 8-bit codes under FSDP2 are kept one per element, shaped as the parameter; one
                # process keeps them flat, padded to whole blocks of 256
                found = torch.cat([found.reshape(-1), value[found.numel():]])
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(found, value, **(tolerance or CLOSE),
                                           msg=lambda m: f"{key}[{entry!r}]: {m}")
            else:
                assert got[entry] == value, f"{key}[{entry!r}]"


def _assert_values_close(got, want, **tolerance):
    """Equal values (dicts, lists, numbers), tensors within `tolerance` (the group state: Prodigy's
    `d` is a sum over every parameter, schedule-free's weight sum a number)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{got!r} != {want!r}"
        for k in want:
            _assert_values_close(got[k], want[k], **tolerance)
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{got!r} != {want!r}"
        for a, b in zip(got, want):
            _assert_values_close(a, b, **tolerance)
    elif isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, **tolerance)
    else:
        assert got == want, f"{got!r} != {want!r}"


# ---- DDP ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_ddp_ranks_hold_identical_parameters(ddp, name):
    _assert_params_equal(ddp[1][name], ddp[0][name], name)


@pytest.mark.parametrize("name", NAMES)
def test_ddp_equals_single_process(ddp, single, name):
    _assert_params_close(ddp[0][name], single[name]["params"], name, **close(name))


# ---- ZeroRedundancyOptimizer and FSDP2: the whole run, and the run resumed from a checkpoint ------

SHARDED = ["zero", "fsdp"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("scenario", SHARDED)
def test_sharded_equals_single_process(request, single, scenario, name):
    """ZeroRedundancyOptimizer (on DDP) and FSDP2: every rank ends with the single-process
    parameters."""
    results = request.getfixturevalue(scenario)
    for rank in range(worker.WORLD):
        _assert_params_close(results[rank][name]["uninterrupted"], single[name]["params"], name,
                             **close(name))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("scenario", SHARDED)
def test_sharded_resumed_from_checkpoint_equals_uninterrupted(request, scenario, name):
    """A new model and optimizer loaded from the checkpoint (ZeRO's consolidated state dict; for
    FSDP2 a torch.distributed.checkpoint save/load through get/set_optimizer_state_dict) continue
    exactly as the run that was not interrupted."""
    results = request.getfixturevalue(scenario)
    for rank in range(worker.WORLD):
        _assert_params_equal(results[rank][name]["resumed"], results[rank][name]["uninterrupted"],
                             name)


# ---- ZeroRedundancyOptimizer's consolidated checkpoint ---------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_zero_consolidated_checkpoint_is_the_single_process_state(zero, single, name):
    saved = zero[0][name]["checkpoint"]["state"]
    expected = single[name]["checkpoint"]["state"]
    _assert_state_matches(saved, expected, keys=list(range(len(expected))), **close(name))


def test_zero_wrapped_in_transforms_sees_the_whole_model(zero):
    """`Transformed(ZeroRedundancyOptimizer(partitioned(AdaGrad-Norm)), skip_nonfinite(),
    clip_by_global_norm(0.05))` on DDP: the transforms see every gradient (DDP's), skip the step
    with an infinite gradient on every rank, and the sum over every parameter covers both ranks'
    partitions: the single-process run's parameters."""
    expected = worker.single_transformed()
    for rank in range(worker.WORLD):
        got = zero[rank]["transformed"]
        assert got["skips"] == 1
        _assert_params_close(got["params"], expected["params"], **CLOSE)


# ---- FSDP2 ------------------------------------------------------------------------------------------

def test_fsdp_shards_are_uneven_and_one_is_empty(fsdp):
    """The layout the other FSDP2 tests rely on: a 7-row weight split 4 + 3, and rank 1 holding
    nothing of the last layer, so a norm of the local shard is not the parameter's norm."""
    shards = [fsdp[rank]["reductions"]["shards"] for rank in range(worker.WORLD)]
    assert shards[0][0] == (4, 6) and shards[1][0] == (3, 6)
    assert shards[1][-2] == (0, 5) and shards[1][-1] == (0,)


def test_fsdp_per_tensor_norms_are_those_of_the_whole_tensor(fsdp):
    """TensorList's norm and rms of sharded parameters and gradients (what LARC and LAMB use)
    equal torch.linalg.vector_norm of the whole tensors of the single-process model; so do the
    norms of a list mixing a sharded, a replicated and a pending-sum DTensor."""
    model = worker.make_model()
    x, y = worker.make_data(0)
    torch.nn.functional.mse_loss(model(x), y).backward()
    params = [p.detach() for p in model.parameters()]
    grads = [p.grad for p in model.parameters()]
    norm = torch.linalg.vector_norm
    pending_sum = sum(torch.randn(5, generator=torch.Generator().manual_seed(
        worker.PARTIAL_SEED + rank), dtype=worker.DTYPE) for rank in range(worker.WORLD))
    expected = {
        "norm": [norm(p) for p in params],
        "rms": [norm(p) / p.numel() ** 0.5 for p in params],
        "grad_norm": [norm(g) for g in grads],
        "grad_rms": [norm(g) / g.numel() ** 0.5 for g in grads],
        "norm_1": [norm(p, 1) for p in params],
        "norm_inf": [norm(p, float("inf")) for p in params],
        "mixed_norm": [norm(params[0]), norm(torch.arange(3.0, dtype=worker.DTYPE)),
                       norm(pending_sum)],
    }
    for rank in range(worker.WORLD):
        for kind, values in expected.items():
            got = fsdp[rank]["reductions"][kind]
            assert all(t.dim() == 0 for t in got)
            torch.testing.assert_close(torch.stack(got), torch.stack(values), **CLOSE,
                                       msg=lambda m: f"rank {rank} {kind}: {m}")


def test_fsdp_sums_over_every_parameter_pair_up_whatever_order_each_rank_has(fsdp):
    """`sum_over_ranks` given the same two sums in a different order on each rank (a chain keeps
    their names in a set, whose order depends on the process's hash seed): every rank gets each
    sum over every tensor and rank, not one paired with the other.  (Prodigy's `d` under FSDP2
    diverged that way.)"""
    parts = [worker.partial_values(rank) for rank in range(worker.WORLD)]
    expected = {name: sum(sum(part[name]) for part in parts) for name in "ab"}
    for rank in range(worker.WORLD):
        got = fsdp[rank]["sums"]
        assert set(got) == {"a", "b"}
        for name in "ab":
            torch.testing.assert_close(got[name], expected[name], **CLOSE)


@pytest.mark.parametrize("name", NAMES)
def test_fsdp_full_optimizer_state_dict_is_the_single_process_state(fsdp, single, name):
    """get_optimizer_state_dict(full_state_dict=True) at the checkpoint: keyed by the parameters'
    names, the values are the single-process optimizer's state."""
    saved = fsdp[0][name]["state"]
    expected = single[name]["checkpoint"]
    groups = worker.param_names(name)
    _assert_state_matches(saved["state"], expected["state"], keys=sum(groups, []), **close(name))
    assert [g["params"] for g in saved["param_groups"]] == groups
    for saved_group, expected_group in zip(saved["param_groups"], expected["param_groups"]):
        hypers = {k: v for k, v in expected_group.items() if k != "params"}
        _assert_values_close({k: saved_group[k] for k in hypers}, hypers, **close(name))


@pytest.mark.parametrize("name", ["Adam", "Adam-8bit", "Lion-8bit"])
def test_fsdp_full_optimizer_state_dict_continues_on_one_plain_process(fsdp, single, name):
    """The whole state dict of an FSDP2 run (8-bit codes kept one per element there) loaded into
    the optimizer of a plain, unsharded model at the same step: the run continues as the
    single-process one."""
    saved = fsdp[0][name]["state"]
    names = sum(worker.param_names(name), [])
    index = {n: i for i, n in enumerate(names)}
    state_dict = {"state": {index[n]: v for n, v in saved["state"].items()},
                  "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                                   for g in saved["param_groups"]]}
    params, _ = worker.train_single(name, worker.STEPS_BEFORE)
    model = worker.make_model(name=name)
    with torch.no_grad():
        for p, value in zip(model.parameters(), params):
            p.copy_(value)
    opt = worker.make_optimizer(name, model.parameters())
    opt.load_state_dict(state_dict)
    worker._train(model, opt, range(worker.STEPS_BEFORE, worker.STEPS))
    _assert_params_close([p.detach() for p in model.parameters()], single[name]["params"], name,
                         **close(name))


def test_fsdp_matrix_work_is_divided_among_ranks(fsdp):
    """Muon under FSDP2: at every step each matrix is orthogonalised once, whole, by one rank
    (its owner), not by every rank; the owners balance the work (`matrix_cost`): the 7 x 6 weight
    on rank 0, the 5 x 7 and 1 x 5 ones on rank 1."""
    steps = worker.STEPS_BEFORE
    work = [fsdp[rank]["Muon+Adam"]["work"] for rank in range(worker.WORLD)]
    # one Newton-Schulz call per step on each rank, on the whole matrices it owns
    assert work[0]["newton_schulz"] == [[(7, 6)]] * steps
    assert work[1]["newton_schulz"] == [[(5, 7), (1, 5)]] * steps
    assert [w["matrices"] for w in work] == [1 * steps, 2 * steps]


def test_fsdp_matrix_communication_is_the_shards_of_what_the_block_reads_and_writes(fsdp):
    """What `run_on_owners` sends for Muon per step, in elements: to each owner, every other
    rank's rows of the matrix, its gradient and its momentum (what `muon_step` reads); from each
    owner, the other ranks' rows of the updated matrix (what it writes).  With the 7 x 6 weight
    on rank 0 (rows 4 + 3), the 5 x 7 (3 + 2) and the 1 x 5 (1 + 0) on rank 1:
    rank 0 sends 3 * (3 * 7 + 1 * 5) + 3 * 6 = 96 (of 95 parameters in all, 82 in matrices),
    rank 1 sends 3 * (3 * 6) + 3 * 7 + 1 * 5 = 80."""
    steps = worker.STEPS_BEFORE
    work = [fsdp[rank]["Muon+Adam"]["work"] for rank in range(worker.WORLD)]
    assert [w["sent"] for w in work] == [96 * steps, 80 * steps]
    assert [w["received"] for w in work] == [80 * steps, 96 * steps]


@pytest.mark.parametrize("name", ["SGD", "Adam", "Adam-scheduled", "Adagrad"])
def test_fsdp_runs_torchs_fused_kernels_on_the_local_shards(fsdp, name):
    """The chains torch has a fused kernel for (`impl="auto"` takes it) run it under FSDP2 on each
    rank's local shards, every parameter at every step (the runs equal the single process: see
    `test_sharded_equals_single_process`)."""
    n_params = len(list(worker.make_model().parameters()))
    for rank in range(worker.WORLD):
        assert fsdp[rank][name]["work"]["fused"] == {"tensors": n_params * worker.STEPS_BEFORE,
                                                      "dtensors": 0}


def test_fsdp_refuses_4_bit_state_before_changing_anything(fsdp):
    for rank in range(worker.WORLD):
        found = fsdp[rank]["four_bits"]
        assert found is not None and "state_bits=4 is not supported for FSDP2" in found["error"]
        assert found["unchanged"] and found["state"] == 0  # (no state entry written)


def test_fsdp_skip_nonfinite_and_global_norm_clipping_see_the_whole_model(fsdp):
    """`Transformed(AdaGrad-Norm, skip_nonfinite(), clip_by_global_norm(0.05))` under FSDP2, with
    an infinite gradient element in a row only rank 1 holds at one step: every rank skips that
    step (as the single process does), the other steps are clipped by the norm of all the
    gradients together, and the chain's sum covers every parameter: the single-process run's
    parameters."""
    expected = worker.single_transformed()
    assert expected["skips"] == 1
    for rank in range(worker.WORLD):
        got = fsdp[rank]["transformed"]
        assert got["skips"] == 1
        _assert_params_close(got["params"], expected["params"], **CLOSE)


@pytest.mark.parametrize("name", NAMES)
def test_fsdp_checkpoint_resumed_on_another_number_of_ranks(resharded, single, name):
    """A torch.distributed.checkpoint saved on 2 ranks, loaded on 1 and on 4 (resharded: the
    parameters' and the state's shards, the replicated state of the whole-matrix blocks, the
    group state), continues as the single-process run: every rank ends with its parameters."""
    world, results = resharded
    if name not in results[0]:
        pytest.skip(f"{name} is not resumed on {world} ranks (worker.RESHARDED_ON_4)")
    for rank in range(world):
        _assert_params_close(results[rank][name], single[name]["params"], name, **close(name))


# ---- optcraft.distributed.partitioned: what it refuses -------------------------------------------

def test_partitioned_refuses_transforms_that_read_every_gradient():
    """Under ZeroRedundancyOptimizer the local optimizer holds a share of the parameters: a
    transform reading every gradient would see a part of the model, so building one is refused,
    naming what to do instead."""
    import optcraft as oc

    def clipped_adam(params, **kwargs):
        return oc.Transformed(oc.Adam(params, **kwargs), oc.clip_by_global_norm(1.0))

    build = oc.distributed.partitioned(clipped_adam)
    with pytest.raises(ValueError, match="clip_by_global_norm reads every gradient.*wrap the "
                                         "ZeroRedundancyOptimizer in Transformed"):
        build([torch.nn.Parameter(torch.zeros(3))], lr=0.01)


def test_partitioned_refuses_a_torch_optimizer_and_a_missing_process_group():
    import optcraft as oc

    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(TypeError, match="did not make an optcraft Optimizer"):
        oc.distributed.partitioned(torch.optim.SGD)(params, lr=0.1)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="not initialised"):
            oc.distributed.partitioned(oc.Prodigy)(params, lr=1.0)


def test_partitioned_step_with_no_gradient_on_any_rank_changes_nothing():
    """A step at which no parameter has a gradient leaves Prodigy's group state (its step count
    `k`, `d`) as one process leaves it: untouched.  The partition's totals over the ranks keep
    "no contribution anywhere" apart from a sum that is 0 (here: one rank, in this process)."""
    import optcraft as oc

    def run(build):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(6, 5))
        opt = build([w], lr=1.0)
        seen = []
        for step in range(4):
            w.grad = None if step == 2 else torch.randn(6, 5)
            opt.step()
            seen.append({k: float(v) for k, v in opt.param_groups[0]["group_state"].items()
                         if k in ("k", "d")})
        return seen, w.detach().clone()

    alone, w_alone = run(oc.Prodigy)
    assert alone[2] == alone[1] and alone[3]["k"] == 3  # (the independent fact: Prodigy's own)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        partitioned, w_partitioned = run(oc.distributed.partitioned(oc.Prodigy))
    finally:
        dist.destroy_process_group()
    assert partitioned == alone
    torch.testing.assert_close(w_partitioned, w_alone, rtol=0, atol=0)
