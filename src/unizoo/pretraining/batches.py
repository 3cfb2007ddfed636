"""Endless batches for step-counted pretraining loops."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch


def endless(loader: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The loader's batches, epoch after epoch.

    Not `itertools.cycle`: that keeps every batch of the first epoch in memory and
    replays them in the same order instead of reshuffling.
    """
    while True:
        yield from loader


def endless_images(loader: Iterable[dict[str, Any]], batch_size: int | None = None) -> Iterator[torch.Tensor]:
    """The loader's images, epoch after epoch, in steps of `batch_size` (None: the loader's batches).

    Splitting the loader's batches rather than building a second loader keeps whatever the
    data module does (shuffling, skipping bad files) the same for pretraining and training.
    """
    for batch in endless(loader):
        yield from batch["image"].split(batch_size or len(batch["image"]))
