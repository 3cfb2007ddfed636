"""A NaN or inf in any loss term stops the stage before it reaches the weights.

Checked before the backward pass, so the optimiser never steps on it and no checkpoint
is written after it: the last periodic checkpoint stays the last good one. Under data
parallelism every rank stops together (one rank's NaN is every rank's decision).
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch

from unizoo.training.checkpoints import last_good_checkpoint, newest_step

LOSS_PREFIX = "train/"  # the model logs each loss term as train/<name>, their weighted sum as train/loss


class NonFiniteLoss(RuntimeError):
    """Training stopped on a NaN or inf loss; the message names the step, the terms and the checkpoint to go back to."""


def raised_in_a_worker(error: BaseException) -> NonFiniteLoss | None:
    """The `NonFiniteLoss` behind a spawned worker's failure (trainer=ddp_cpu), whose traceback arrives as text."""
    marker = f"{NonFiniteLoss.__module__}.{NonFiniteLoss.__name__}: "
    lines = [line for line in str(error).splitlines() if line.startswith(marker)]
    return NonFiniteLoss(lines[-1].removeprefix(marker)) if lines else None


class StopOnNonFiniteLoss(L.Callback):
    """Raises `NonFiniteLoss` when the loss about to be backpropagated is not finite.

    checkpoints: the stage's periodic checkpoint folder.
    earlier:     the checkpoint the stage started from (the previous stage's), if any.
    """

    def __init__(self, stage: str, checkpoints: Path, earlier: Path | None = None) -> None:
        self.stage, self.checkpoints, self.earlier = stage, Path(checkpoints), earlier

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise NonFiniteLoss(self.message(trainer, loss))

    def message(self, trainer: L.Trainer, loss: torch.Tensor) -> str:
        # This step's logged terms (training_step logs them before returning the loss).
        terms = {
            key.removeprefix(LOSS_PREFIX): float(value)
            for key, value in trainer.callback_metrics.items()
            if key.startswith(LOSS_PREFIX) and key != f"{LOSS_PREFIX}loss"
        }
        bad_terms = {name: value for name, value in terms.items() if not math.isfinite(value)}
        named = ", ".join(f"{name}={value}" for name, value in bad_terms.items()) or (
            f"loss={float(loss)} (on another rank)" if math.isfinite(float(loss)) else f"loss={float(loss)}"
        )
        good = last_good_checkpoint(self.checkpoints)
        if good is not None:
            step = newest_step(self.checkpoints)
            where = f"the last good checkpoint is {good}" + (f" (after step {step})" if step is not None else "") + ", kept"
        elif self.earlier is not None:
            where = f"this stage saved no checkpoint yet; the last good one is {self.earlier}, which the stage started from"
        else:
            where = "no checkpoint was saved before it"
        return (
            f"stage {self.stage!r} stopped at step {trainer.global_step + 1}: non-finite loss term {named}. "
            f"No update was made with it; {where}."
        )
