"""The training order: the seeded shuffling DataLoader's on one process, resumable mid-epoch, sharded equally."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader

from unizoo.data.datamodule import ShapesDataModule
from unizoo.data.sampler import ResumableSampler


def batches(sampler, batch_size: int, epochs: int) -> list[list[int]]:
    """Batches of `epochs` full passes, each consumed to the end (as a DataLoader loop does)."""
    batch_sampler = BatchSampler(sampler, batch_size, drop_last=True)
    return [batch for _ in range(epochs) for batch in batch_sampler]


def loader_batches(loader, epochs: int) -> list[list[int]]:
    return [batch.tolist() for _ in range(epochs) for batch in loader]


@pytest.mark.parametrize(("size", "batch_size"), [(100, 16), (64, 8), (7, 2)])
def test_one_process_reproduces_the_seeded_shuffling_loader(size, batch_size):
    # The order unizoo's loaders had before they were resumable (and cached pretrained models saw).
    before = DataLoader(range(size), batch_size, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(3))
    now = DataLoader(range(size), batch_size, sampler=ResumableSampler(size, seed=3, rank=0, num_replicas=1), drop_last=True,
                     generator=torch.Generator().manual_seed(3))
    assert loader_batches(now, 4) == loader_batches(before, 4)


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
    # The order the data module had before it was resumable, over two epochs, and no global RNG drawn.
    dataset = dm.dataset("train")
    before = DataLoader(range(24), 4, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(dm.seed))
    state = torch.random.get_rng_state()
    captions = [b["caption"] for _ in range(2) for b in loader]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert captions == [[dataset[i]["caption"] for i in batch] for batch in loader_batches(before, 2)]
