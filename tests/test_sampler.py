"""The training order: torch's seeded RandomSampler on one process, resumable mid-epoch, sharded equally."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import BatchSampler, RandomSampler

from unizoo.data.datamodule import ShapesDataModule
from unizoo.data.sampler import ResumableSampler


def batches(sampler, batch_size: int, epochs: int) -> list[list[int]]:
    """Batches of `epochs` full passes, each consumed to the end (as a DataLoader loop does)."""
    batch_sampler = BatchSampler(sampler, batch_size, drop_last=True)
    return [batch for _ in range(epochs) for batch in batch_sampler]


@pytest.mark.parametrize(("size", "batch_size"), [(100, 16), (64, 8), (7, 2)])
def test_one_process_reproduces_seeded_random_sampler(size, batch_size):
    reference = RandomSampler(range(size), generator=torch.Generator().manual_seed(3))
    assert batches(ResumableSampler(size, seed=3, rank=0, num_replicas=1), batch_size, 3) == batches(reference, batch_size, 3)


def test_epochs_differ_and_set_epoch_replays_any_of_them():
    sampler = ResumableSampler(50, seed=1, rank=0, num_replicas=1)
    first, second, third = (list(sampler) for _ in range(3))
    assert sorted(first) == list(range(50)) and first != second != third
    sampler.set_epoch(1)
    assert list(sampler) == second
    sampler.set_epoch(0)
    assert list(sampler) == first


@pytest.mark.parametrize("done", [0, 1, 5, 6, 7, 13])
def test_start_after_continues_the_uninterrupted_order(done):
    size, batch_size = 50, 8  # 6 batches per epoch
    whole = batches(ResumableSampler(size, seed=2, rank=0, num_replicas=1), batch_size, 3)
    resumed = ResumableSampler(size, seed=2, rank=0, num_replicas=1)
    resumed.start_after(done, batch_size)
    epoch = done // 6
    rest = []
    for e in range(epoch, 3):  # as Lightning does: set_epoch, then a full pass
        resumed.set_epoch(e)
        rest.extend(BatchSampler(resumed, batch_size, drop_last=True))
    assert rest == whole[done:]


def test_ranks_split_each_global_batch_of_one_process():
    size, world, local = 70, 2, 4
    one = batches(ResumableSampler(size, seed=5, rank=0, num_replicas=1), world * local, 1)
    shards = [batches(ResumableSampler(size, seed=5, rank=r, num_replicas=world), local, 1) for r in range(world)]
    assert len(shards[0]) == len(shards[1]) == len(one) == 70 // 8
    for step, global_batch in enumerate(one):
        assert sorted(itertools.chain(*(shard[step] for shard in shards))) == sorted(global_batch)


def test_datamodule_train_loader_uses_it_and_replays():
    dm = ShapesDataModule(batch_size=4, train_size=24, val_size=8, test_size=8)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, ResumableSampler) and len(loader) == 6
    # The order the data module had before it was resumable: torch's RandomSampler seeded with data.seed.
    dataset = dm.dataset("train")
    before = BatchSampler(RandomSampler(dataset, generator=torch.Generator().manual_seed(dm.seed)), 4, drop_last=True)
    assert [b["caption"] for b in loader] == [[dataset[i]["caption"] for i in batch] for batch in before]
