"""Every training step draws its randomness from a seed of its own: (recipe seed, stage, batch, rank).

The objective's noise and timesteps come from the global RNGs. Seeding them at each
step makes step k's draws a function of where the run is, not of everything drawn
before it (evaluations, validation, a restart), so a run resumed at step k draws exactly
what the uninterrupted run drew, with no RNG state to save; and data-parallel ranks draw
different noise for their different samples instead of repeating rank 0's.
"""

from __future__ import annotations

import hashlib
import random

import lightning as L
import numpy as np
import torch


def step_seed(seed: int, *position: object) -> int:
    """A 63-bit seed from the recipe seed and a position such as (stage, batch, rank)."""
    digest = hashlib.sha256("/".join(map(str, (seed, *position))).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_all(seed: int) -> None:
    """Python's, NumPy's and torch's (every device's) global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class StepSeeding(L.Callback):
    """Seeds the global RNGs before each training and validation batch of stage `stage`."""

    def __init__(self, seed: int, stage: str) -> None:
        self.seed, self.stage = seed, stage

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        # total_batch_idx counts the stage's batches across epochs and is restored on resume.
        seed_all(step_seed(self.seed, self.stage, "train", trainer.fit_loop.total_batch_idx, trainer.global_rank))

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        # The same noise at every validation: losses of one run are comparable over time.
        seed_all(step_seed(self.seed, self.stage, "val", batch_idx, trainer.global_rank))
