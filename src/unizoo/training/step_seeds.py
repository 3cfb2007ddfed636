"""Every training step draws its randomness from a generator of its own, seeded from (recipe seed, stage, batch, rank).

The objective's noise, noise levels and condition dropout come from the model's `step_rng`:
one `torch.Generator` on the model's device per stage, re-seeded before each batch from
where the run is. Step k's draws are then a function of its position, not of everything
drawn before it (evaluations, validation, a restart), so a run resumed at step k draws
exactly what the uninterrupted run drew, with no RNG state to save; and data-parallel
ranks draw different noise for their different samples instead of repeating rank 0's.

Only that generator is seeded: the global RNGs (and every CUDA device's) are left alone, and
re-seeding a generator is a host-side operation that never waits for the device.
"""

from __future__ import annotations

import hashlib

import lightning as L
import torch


def step_seed(seed: int, *position: object) -> int:
    """A 63-bit seed from the recipe seed and a position such as (stage, batch, rank)."""
    digest = hashlib.sha256("/".join(map(str, (seed, *position))).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class StepSeeding(L.Callback):
    """Hands the model a freshly seeded `step_rng` before each training and validation batch of stage `stage`."""

    def __init__(self, seed: int, stage: str) -> None:
        self.seed, self.stage = seed, stage
        self._generators: dict[torch.device, torch.Generator] = {}

    def _seeded(self, pl_module: L.LightningModule, *position: object) -> torch.Generator:
        device = pl_module.device
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device].manual_seed(step_seed(self.seed, self.stage, *position))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        # total_batch_idx counts the stage's batches across epochs and is restored on resume.
        pl_module.step_rng = self._seeded(pl_module, "train", trainer.fit_loop.total_batch_idx, trainer.global_rank)

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        # The same noise at every validation: losses of one run are comparable over time.
        pl_module.step_rng = self._seeded(pl_module, "val", batch_idx, trainer.global_rank)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        pl_module.step_rng = None  # a generator is no module state: copies and pickles of the model never carry it

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        pl_module.step_rng = None

    def __getstate__(self) -> dict:
        # trainer=ddp_cpu pickles the callbacks into its workers; generators are made there.
        return {"seed": self.seed, "stage": self.stage, "_generators": {}}
