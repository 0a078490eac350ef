"""Deterministic sharding over ranks and DataLoader workers (asyncframes._shard): pure."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncframes._shard import Shard, items_of, order, rank_from_env

pytestmark = pytest.mark.pure


@given(count=st.integers(0, 500), world=st.integers(1, 5), workers=st.integers(1, 4), shuffle=st.booleans(),
       seed=st.integers(0, 2**32), epoch=st.integers(0, 100))
def test_every_item_exactly_once_over_all_ranks_and_workers(count, world, workers, shuffle, seed, epoch):
    got = [int(i) for r in range(world) for w in range(workers)
           for i in items_of(Shard(r, world, w, workers), count, shuffle, seed, epoch)]
    assert sorted(got) == list(range(count))


def test_the_order_is_the_same_on_every_rank_and_new_each_epoch():
    assert (order(100, True, seed=1, epoch=3) == order(100, True, seed=1, epoch=3)).all()
    assert (order(100, True, seed=1, epoch=3) != order(100, True, seed=1, epoch=4)).any()
    assert (order(100, False, seed=1, epoch=4) == list(range(100))).all()


def test_rank_and_world_size_from_the_launchers_variables():
    assert rank_from_env({"RANK": "3", "WORLD_SIZE": "8", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}) == (3, 8)
    assert rank_from_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == (1, 2)
    assert rank_from_env({"RANK": "1"}) is None  # half a pair is no launcher
    with pytest.raises(ValueError, match="RANK=4 is outside 0..3"):
        rank_from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="expected integers"):
        rank_from_env({"RANK": "a", "WORLD_SIZE": "2"})


def test_a_shard_outside_its_world_is_refused_naming_it():
    with pytest.raises(ValueError, match="rank must be in 0..1 for world_size 2, got 2"):
        Shard(rank=2, world_size=2)
    with pytest.raises(ValueError, match="worker must be in 0..0"):
        Shard(worker=1, num_workers=1)
