"""Fault injection for tests (the recipe's `debug` block): a NaN loss, or a pause to kill the run in.

    debug.nan_at=generation:3     step 3 of stage generation sees NaN images, so its losses are NaN
    debug.pause_at=generation:3   before step 3 of stage generation (steps 1-2 done and checkpointed
                                  at every_n_steps=1), write RUN_DIR/paused-generation-3 and wait
                                  until killed

Steps count from 1 within a stage. Both are off (null) in every shipped recipe.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch

from unizoo.errors import RecipeError

KEYS = ("nan_at", "pause_at")


def parse_position(value: str | None, key: str, stages: list[str] | None = None) -> tuple[str, int] | None:
    """`"<stage>:<step>"` -> (stage, step); None stays None. With `stages`, the stage must be one of them."""
    if value is None:
        return None
    stage, _, step = str(value).rpartition(":")
    if not stage or not step.isdigit() or int(step) < 1 or (stages is not None and stage not in stages):
        valid = f"one of {', '.join(stages)}" if stages else "a stage name"
        raise RecipeError(f"{key}={value!r}: expected '<stage>:<step>' with <stage> {valid} and a step from 1, e.g. 'generation:3'")
    return stage, int(step)


def check_debug(debug, stages: list[str]) -> None:
    """Raise `RecipeError` before a run starts if the `debug` block names no valid position."""
    for key in KEYS:
        parse_position((debug or {}).get(key), f"debug.{key}", stages)


def pause_marker(run_dir: Path, stage: str, step: int) -> Path:
    return Path(run_dir) / f"paused-{stage}-{step}"


class FaultInjection(L.Callback):
    """Poisons the batch of step `nan_at` and/or pauses before step `pause_at` (steps of this stage, from 1)."""

    def __init__(self, run_dir: Path, stage: str, nan_at: int | None = None, pause_at: int | None = None) -> None:
        self.run_dir, self.stage, self.nan_at, self.pause_at = Path(run_dir), stage, nan_at, pause_at

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        step = trainer.global_step + 1
        if step == self.pause_at:
            pause_marker(self.run_dir, self.stage, step).touch()
            while True:  # until SIGKILL
                time.sleep(60)
        if step == self.nan_at:
            for value in batch.values():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    value.fill_(float("nan"))


def fault_injection(debug, run_dir: Path, stage: str) -> list[L.Callback]:
    """The `FaultInjection` for `stage` that the recipe's `debug` block asks for, if any."""
    if not debug:
        return []
    at = {key: parse_position(debug.get(key), f"debug.{key}") for key in KEYS}
    mine = {key: position[1] for key, position in at.items() if position is not None and position[0] == stage}
    return [FaultInjection(run_dir, stage, **mine)] if mine else []
