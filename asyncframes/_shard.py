"""Which items a training process and its data-loading worker read: deterministic sharding.

Everything that decides the order of a dataset's items and their split over ranks and
workers lives here, so that "every item exactly once per epoch, over all ranks and
workers, and the same order on every rank" has one home and pure tests beside it
(``tests/test_shard.py``). Pure: no torch, no I/O; the caller passes the environment.
"""

from __future__ import annotations

from typing import Mapping, Optional

import attrs
import numpy as np


@attrs.frozen
class Shard:
    """Where this process stands: its rank among ``world_size`` training processes, and its
    DataLoader worker among ``num_workers`` (0 of 1 in the main process)."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    def __attrs_post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in 0..{self.world_size - 1} for world_size {self.world_size}, got {self.rank}")
        if self.num_workers < 1 or not 0 <= self.worker < self.num_workers:
            raise ValueError(f"worker must be in 0..{self.num_workers - 1} for {self.num_workers} workers, got {self.worker}")

    @property
    def index(self) -> int:
        """This shard's number among :attr:`count`: ranks first, then their workers."""
        return self.rank * self.num_workers + self.worker

    @property
    def count(self) -> int:
        return self.world_size * self.num_workers


def rank_from_env(env: Mapping[str, str]) -> Optional[tuple[int, int]]:
    """``(rank, world_size)`` from the launcher's variables: ``RANK``/``WORLD_SIZE`` (torchrun,
    accelerate), else ``SLURM_PROCID``/``SLURM_NTASKS`` (srun); None if neither is set.

    Raises:
        ValueError: a variable that is not a number, or a rank outside the world.
    """
    for rank_name, size_name in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_name in env and size_name in env:
            try:
                rank, size = int(env[rank_name]), int(env[size_name])
            except ValueError:
                raise ValueError(f"{rank_name}={env[rank_name]!r}, {size_name}={env[size_name]!r}: expected integers") from None
            if size < 1 or not 0 <= rank < size:
                raise ValueError(f"{rank_name}={rank} is outside 0..{size - 1} ({size_name}={size})")
            return rank, size
    return None


def order(count: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """The items' order in ``epoch``: ``0..count-1``, shuffled by ``(seed, epoch)`` if asked
    (the same on every rank and worker, a new order each epoch)."""
    items = np.arange(count, dtype=np.int64)
    if shuffle:
        np.random.default_rng([seed, epoch]).shuffle(items)
    return items


def items_of(shard: Shard, count: int, shuffle: bool = False, seed: int = 0, epoch: int = 0) -> np.ndarray:
    """The items ``shard`` reads in ``epoch``, in order: every ``shard.count``-th of the epoch's
    order, from ``shard.index``. Over all shards, every item exactly once."""
    return order(count, shuffle, seed, epoch)[shard.index :: shard.count]
