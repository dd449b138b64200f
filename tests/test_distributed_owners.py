"""The owner assignment of whole-matrix blocks under FSDP2 (`optcraft.distributed`), as a pure
function: no process group needed."""
from __future__ import annotations

import pytest

from optcraft.distributed import _rows_of, assign_owners, matrix_cost

pytestmark = pytest.mark.slow


def test_owners_balance_the_newton_schulz_work():
    # GPT-2 small's four matrices of a block, twelve blocks, on 4 ranks: every rank within 15%
    # of the mean, each matrix on one rank.
    shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12
    loads = [0] * 4
    owners = assign_owners(shapes, 4, loads)
    assert sorted(set(owners)) == [0, 1, 2, 3]
    assert loads == [sum(matrix_cost(s) for s, o in zip(shapes, owners) if o == r)
                     for r in range(4)]
    mean = sum(loads) / 4
    assert max(loads) <= 1.15 * mean and min(loads) >= 0.85 * mean


def test_owners_carry_the_load_between_calls():
    # the reference path calls a block once per parameter: the loads carry over, so a second
    # matrix of the same size goes to the other rank
    loads = [0, 0]
    assert assign_owners([(8, 8)], 2, loads) == [0]
    assert assign_owners([(8, 8)], 2, loads) == [1]


def test_rows_are_fsdp2s_split():
    assert _rows_of(7, 2) == (4, [4, 3])
    assert _rows_of(1, 2) == (1, [1, 0])
    assert _rows_of(7, 4) == (2, [2, 2, 2, 1])
    assert _rows_of(5, 4) == (2, [2, 2, 1, 0])
