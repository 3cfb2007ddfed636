"""A NaN or inf in any loss term stops the stage before it reaches the weights.

No optimiser step is ever made with a non-finite loss, and no checkpoint is written after
one: the last periodic checkpoint stays the last good one. Under data parallelism every rank
stops together (one rank's NaN is every rank's decision).

How, without making every step wait for the device: with a fused torch optimiser (the
recipes' AdamW is `fused: true`), the loss's finiteness is handed to the optimiser as
`found_inf` (GradScaler's protocol), so the update of a non-finite step is skipped on the
device, and the first such step and its loss terms are recorded there too. The host reads
that record only every `trainer.log_every_n_steps` steps (when the loss log is read anyway),
before every checkpoint and at the end of the stage, and stops the stage then, naming the
step where it happened. An optimiser that cannot skip on the device (any other) is checked
on the host at every step, as before.
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


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` skips its update when given `found_inf` (torch's fused Adam, AdamW, SGD, Adagrad)."""
    return bool(getattr(optimizer, "defaults", {}).get("fused")) and isinstance(
        optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)
    )


class StopOnNonFiniteLoss(L.Callback):
    """Raises `NonFiniteLoss` for a loss that is not finite, having made no update with it.

    checkpoints: the stage's periodic checkpoint folder.
    earlier:     the checkpoint the stage started from (the previous stage's), if any.
    """

    def __init__(self, stage: str, checkpoints: Path, earlier: Path | None = None) -> None:
        self.stage, self.checkpoints, self.earlier = stage, Path(checkpoints), earlier
        self._first_bad: torch.Tensor | None = None  # on the device: the first non-finite step, -1 while none
        self._bad_terms: torch.Tensor | None = None  # on the device: that step's loss terms
        self._term_names: list[str] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._first_bad = None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        if optimizer is None or not skips_on_device(optimizer):
            bad = not bool(torch.isfinite(loss.detach()).all())
            if trainer.world_size > 1:
                bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
            if bad:
                raise NonFiniteLoss(self.message(trainer, loss))
            return
        bad = ~torch.isfinite(loss.detach()).all()
        optimizer.found_inf = bad.to(torch.float32)  # read by the fused step: no update with it
        terms = {key: value for key, value in trainer.callback_metrics.items() if key.startswith(LOSS_PREFIX)}
        values = torch.stack([value.detach().float().reshape(()).to(loss.device) for value in terms.values()])
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._bad_terms = torch.zeros_like(values)
            self._term_names = list(terms)
        first = bad & (self._first_bad < 0)
        self._first_bad = torch.where(first, trainer.global_step + 1, self._first_bad)
        self._bad_terms = torch.where(first, values, self._bad_terms)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self.check(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.check(trainer)  # raising here writes no checkpoint after a non-finite step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer)

    def check(self, trainer: L.Trainer) -> None:
        """Read the device's record (a host read): raise `NonFiniteLoss` if any step so far had a non-finite loss."""
        if self._first_bad is None:
            return
        step = int(self._first_bad)
        bad = step >= 0
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        terms = dict(zip(self._term_names, self._bad_terms.tolist())) if step >= 0 else {}
        raise NonFiniteLoss(self.message(trainer, None, step=step if step >= 0 else None, terms=terms))

    def message(self, trainer: L.Trainer, loss: torch.Tensor | None, step: int | None = None, terms: dict | None = None) -> str:
        """`loss`: the step's loss (checked on the host now); or `step` and its logged `terms`, read from the device's record."""
        if terms is None:
            # This step's logged terms (training_step logs them before returning the loss).
            terms = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith(LOSS_PREFIX)}
        logged_total = terms.pop(f"{LOSS_PREFIX}loss", None)
        total = logged_total if loss is None else float(loss)
        bad_terms = {key.removeprefix(LOSS_PREFIX): value for key, value in terms.items() if not math.isfinite(value)}
        named = ", ".join(f"{name}={value}" for name, value in bad_terms.items()) or (
            f"loss={total} (on another rank)" if total is None or math.isfinite(total) else f"loss={total}"
        )
        step = trainer.global_step + 1 if step is None else step
        good = last_good_checkpoint(self.checkpoints)
        if good is not None:
            saved = newest_step(self.checkpoints)
            where = f"the last good checkpoint is {good}" + (f" (after step {saved})" if saved is not None else "") + ", kept"
        elif self.earlier is not None:
            where = f"this stage saved no checkpoint yet; the last good one is {self.earlier}, which the stage started from"
        else:
            where = "no checkpoint was saved before it"
        return (
            f"stage {self.stage!r} stopped at step {step}: non-finite loss term {named}. "
            f"No update was made with it; {where}."
        )
