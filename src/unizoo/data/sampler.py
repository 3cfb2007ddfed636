"""The training order: shuffled per epoch, sharded over data-parallel ranks, resumable mid-epoch.

Epoch `e`'s order is a pure function of `(seed, e)`, so a resumed run can rebuild the
order it was in and skip the batches it had already trained on; nothing about the
order needs saving. On one process it reproduces the order of
`DataLoader(shuffle=True, generator=Generator().manual_seed(seed))` with `num_workers=0`
epoch after epoch, so runs and cached pretrained models keep the data order they had
before resuming existed (see `ResumableSampler.order`).

A subclass of `DistributedSampler` so that Lightning leaves it in place under DDP instead of
re-sharding with an order of its own: rank `r` of `W` takes positions `r, r + W, ...`
of the epoch's order, so one step of `W` processes at batch `B` sees exactly the samples
of one step of one process at batch `W * B`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import distributed
from torch.utils.data import DistributedSampler


def process_rank_and_count() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if distributed.is_available() and distributed.is_initialized():
        return distributed.get_rank(), distributed.get_world_size()
    return 0, 1


def batches_trained(trainer) -> int:
    """Batches the trainer's fit has consumed (restored from its checkpoint on resume); 0 outside a fit."""
    if trainer is None:
        return 0
    return trainer.global_step * trainer.accumulate_grad_batches


class ResumableSampler(DistributedSampler):
    """Indices `0..size-1`, a fresh permutation each epoch, this rank's share, optionally starting mid-epoch.

    `set_epoch` picks the epoch (Lightning calls it before each); without it every
    `iter()` moves on to the next epoch, as `RandomSampler` does.
    """

    def __init__(self, size: int, seed: int = 0, rank: int | None = None, num_replicas: int | None = None) -> None:
        default_rank, default_count = process_rank_and_count()
        rank = default_rank if rank is None else rank
        num_replicas = default_count if num_replicas is None else num_replicas
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        # Not super().__init__: that needs a data set and a process group; only the
        # attributes DistributedSampler users read are set.
        self.size, self.seed, self.rank, self.num_replicas = int(size), int(seed), rank, num_replicas
        self.num_samples = self.size // num_replicas  # an equal share per rank: the tail is dropped
        self.total_size = self.num_samples * num_replicas
        self.shuffle, self.drop_last = True, True
        self.epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, indices of this rank to skip in it)
        self._generator, self._draws = torch.Generator(), 0  # epochs drawn so far from `seed`
        self._generator.manual_seed(self.seed)

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def start_after(self, batches: int, batch_size: int) -> None:
        """Skip the first `batches` batches of `batch_size` (this rank's, counted from epoch 0, drop_last)."""
        per_epoch = self.num_samples // batch_size
        if batches <= 0 or per_epoch == 0:
            self._skip = None
            return
        epoch, offset = divmod(batches, per_epoch)
        self._skip = (epoch, offset * batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """Epoch `epoch`'s permutation of every index (before sharding).

        Replays what a shuffling DataLoader draws from its seeded generator per fully
        consumed epoch: the iterator's base seed (one int64), the sampler's permutation,
        and a second permutation that RandomSampler draws for the empty remainder as the
        epoch ends.
        """
        if epoch < self._draws:
            self._generator.manual_seed(self.seed)
            self._draws = 0
        while True:
            torch.empty((), dtype=torch.int64).random_(generator=self._generator)
            permutation = torch.randperm(self.size, generator=self._generator)
            torch.randperm(self.size, generator=self._generator)
            self._draws += 1
            if self._draws > epoch:
                return permutation

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        self.epoch += 1  # a later iter() without set_epoch moves on, like RandomSampler
        mine = self.order(epoch)[: self.total_size][self.rank :: self.num_replicas].tolist()
        if self._skip is not None and self._skip[0] == epoch:
            mine = mine[self._skip[1] :]
        return iter(mine)
