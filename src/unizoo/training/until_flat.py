"""Stages that train until their evaluated curve is flat (`strategy.until_flat`), and the verdict the report shows.

A stage with `until_flat` runs at most `max_steps`; every `evaluation.every_n_steps` the run
evaluates it (`unizoo.eval.periodic_evaluation`), and right after, `StopWhenFlat` asks the
stage's `UntilFlat` whether the headline score has stopped rising (the best of the last
`window` evaluations beats the best before them by less than `min_gain`). If so the stage
ends there. Its verdict goes to metrics.json as `converged`:

    {"generation": {"state": "flat", "step": 2500, "max_steps": 8000, "window": 3, "min_gain": 0.01}}

`state` is "flat" (stopped early, or flat at its last evaluation) or "still rising" (it hit
`max_steps` while still climbing: the study reports such a cell, never its scores as a result).
The learning rate follows the schedule of `max_steps`: a stage stopped early has not annealed.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from unizoo.components.strategies.stages import Stage, UntilFlat
from unizoo.errors import RecipeError

FLAT, RISING = "flat", "still rising"


def stage_scores(points: list[dict[str, Any]], stage: str, score: str) -> list[float]:
    """The headline `score` of each evaluation recorded during `stage`'s training (its curve), oldest first."""
    return [point["generation"][score] for point in points
            if point.get("stage") == stage and point.get("phase", "").startswith(f"{stage}_step") and score in point.get("generation", {})]


def check_until_flat(stages: list[Stage], every_n_steps: int | None) -> None:
    """A stage that trains until flat needs the curve it watches: raise `RecipeError` without one."""
    flat = [stage.name for stage in stages if stage.until_flat is not None]
    if flat and not every_n_steps:
        raise RecipeError(f"strategy.until_flat watches the evaluated curve of stage(s) {', '.join(flat)}, which needs "
                          "evaluation.every_n_steps (e.g. evaluation.every_n_steps=250)")


class StopWhenFlat(L.Callback):
    """Ends the stage's training at the first periodic evaluation after which its curve is flat.

    `points()`: the run's curve points so far (only the primary process evaluates; the others
    see none and follow its decision).
    """

    def __init__(self, stage: Stage, points, score: str, every_n_steps: int) -> None:
        self.stage, self.points, self.score, self.every_n_steps = stage, points, score, every_n_steps
        self.stopped_at: int | None = None
        self._checked = 0

    def __getstate__(self) -> dict:
        # trainer=ddp_cpu pickles callbacks into spawned workers, which cannot see the run's curve.
        return {**self.__dict__, "points": None}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or step <= self._checked or step >= trainer.max_steps:
            return
        self._checked = step
        flat = False
        if self.points is not None and trainer.is_global_zero:
            flat = self.stage.until_flat.is_flat(stage_scores(self.points(), self.stage.name, self.score))
        if trainer.world_size > 1:
            flat = trainer.strategy.reduce_boolean_decision(flat, all=False)
        if flat:
            self.stopped_at = step
            trainer.should_stop = True


def verdict(until_flat: UntilFlat, scores: list[float], stopped_at: int | None, trained_steps: int) -> dict[str, Any]:
    """The stage's `converged` entry: flat where it stopped early or where its full curve ends flat, else still rising.

    `scores`: the stage's curve including its end-of-stage evaluation.
    """
    state = FLAT if stopped_at is not None or until_flat.is_flat(scores) else RISING
    return {"state": state, "step": stopped_at if stopped_at is not None else trained_steps,
            "max_steps": until_flat.max_steps, "window": until_flat.window, "min_gain": until_flat.min_gain}
