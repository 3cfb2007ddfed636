"""The DataLoader of a map-style split: the training order that shards over ranks and resumes mid-epoch."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from unizoo.data.sampler import ResumableSampler, batches_trained
from unizoo.runtime.accelerator import AUTO_WORKERS, loader_options


def map_style_loader(dataset: Dataset, batch_size: int, seed: int, train: bool, num_workers: int | str, trainer=None) -> DataLoader:
    """Shuffled, rank-sharded and resumable for training (as the shapes data's); in order otherwise."""
    sampler, generator = None, None
    if train:
        sampler = ResumableSampler(len(dataset), seed=seed)
        sampler.start_after(batches_trained(trainer), batch_size)
        generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train,
        generator=generator,
        # num_workers: auto gives workers to training on a GPU; the val split is then read in place.
        **loader_options(num_workers if train or num_workers != AUTO_WORKERS else 0),
    )
