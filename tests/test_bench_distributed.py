"""`optcraft bench --ranks` (optcraft.bench_distributed): what it counts is what Muon's owner
scheme sends, on tiny shapes whose owners and bytes are worked out here by hand.

Four matrices on 2 ranks, in float32 (4 bytes an element): A 16 x 8 (Newton-Schulz's work
`min(r, c)^2 max(r, c)` = 1024), B 8 x 8 (512), C 8 x 4 (128), D 5 x 4 (80).  Balanced greedily,
largest first: A to rank 0, then B, C and D each to rank 1 (the least loaded: 512, 640, 720 <
1024).  FSDP2 gives rank 0 the first half of every matrix's rows (3 of D's 5) and rank 1 the
rest.  A rank sends its rows of the parameter, the gradient and the momentum of each matrix
another rank owns (gathered there), and the other ranks' rows of each new parameter it owns
(scattered back):

* rank 0: 3 x (B 32 + C 16 + D 12) + A 64 = 244 elements, 976 bytes;
* rank 1: 3 x A 64 + (B 32 + C 16 + D 12) = 252 elements, 1008 bytes.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from optcraft import bench_distributed

SHAPES = [(16, 8), (8, 8), (8, 4), (5, 4)]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="this torch has no torch.distributed with gloo")


@pytest.fixture(scope="module")
def two_ranks():
    return bench_distributed.run_ranks(SHAPES, 2, steps=1, warmup=1)


@pytest.mark.slow
def test_counts_the_bytes_each_rank_sends(two_ranks):
    rank0, rank1 = two_ranks
    assert [rank0["matrices"], rank1["matrices"]] == [1, 3]
    # the four matrices are one bucket: one gather to each owner (rank 0 for A; rank 1 for B,
    # C and D) of all 3 tensors of its matrices, one scatter from each of the new parameters
    for rank in two_ranks:
        assert rank["calls"]["gather"] == 2
        assert rank["calls"]["scatter"] == 2
        assert rank["calls"].get("broadcast", 0) == 0
    assert rank0["bytes"]["gather"] + rank0["bytes"]["scatter"] == 244 * 4
    assert rank1["bytes"]["gather"] + rank1["bytes"]["scatter"] == 252 * 4
    assert rank0["bytes"]["gather"] == 3 * (32 + 16 + 12) * 4   # rank 0 owns A only
    assert rank1["bytes"]["scatter"] == (32 + 16 + 12) * 4
    # the formula the bench prints beside the measurement
    assert [rank0["predicted"], rank1["predicted"]] == [976, 1008]
    # what changed is described in one all_gather_object: a size and a few pickled bytes
    for rank in two_ranks:
        assert rank["calls"]["allgather"] == 2
        assert 0 < rank["bytes"]["allgather"] < 1000


@pytest.mark.slow
def test_the_counted_step_is_muons(two_ranks):
    """Counting changes nothing: after the timed steps and the counted one, the parameters are
    those of Muon in one process, on the same whole gradients."""
    _, single = bench_distributed.single_process(SHAPES, steps=1, warmup=1)
    for sharded, whole in zip(two_ranks[0]["params"], single):
        torch.testing.assert_close(sharded, whole, rtol=1e-6, atol=1e-7)


def test_formula_pads_rows_as_fsdp2_splits_them():
    # 6 x 4 on 4 ranks: torch.chunk gives 2, 2, 2 and 0 rows, each padded to 2 rows.  Owned by
    # rank 0: ranks 1 to 3 send 3 tensors x 2 rows x 4 columns (rank 3's all padding), and rank 0
    # scatters 2 rows x 4 columns to each of the 3 others.
    shapes, owners = [(6, 4)], [0]
    assert [bench_distributed.predicted_bytes(shapes, owners, 4, r) for r in range(4)] == \
        [3 * 2 * 4 * 4] + [3 * 2 * 4 * 4] * 3
    assert bench_distributed.predicted_bytes(shapes, owners, 4, 1, reads=2) == 2 * 2 * 4 * 4
    assert bench_distributed.predicted_bytes(shapes, [0], 1, 0) == 0


def test_ranks_option_errors():
    from optcraft import bench

    for bad in ("0", "1,x", ""):
        with pytest.raises(SystemExit) as raised:
            bench.main(["--ranks", bad])
        assert raised.value.code == 2
