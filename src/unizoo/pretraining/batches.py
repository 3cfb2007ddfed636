"""Endless batches for step-counted pretraining loops."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any


def endless(loader: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The loader's batches, epoch after epoch.

    Not `itertools.cycle`: that keeps every batch of the first epoch in memory and
    replays them in the same order instead of reshuffling.
    """
    while True:
        yield from loader
