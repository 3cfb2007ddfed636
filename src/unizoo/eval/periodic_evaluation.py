"""Scores against training steps and training wall time: the curve a study draws.

`EvaluationCurve` runs the run's evaluation before training, every
``evaluation.every_n_steps`` optimiser steps (a Lightning callback) and at the end of
each stage, and records each point with its step (counted across stages) and its
training wall time (evaluation time excluded, so the x axis does not depend on how
often one evaluates). Evaluations run under a forked RNG: a curve never changes the
training it observes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

log = logging.getLogger(__name__)

Evaluate = Callable[[str, bool], dict]  # (phase, full) -> scores; full adds the costly extras (grids, diversity)


class EvaluationCurve:
    """Evaluations recorded as points; the run says when a stage's training starts and finishes."""

    def __init__(self, evaluate: Evaluate, on_point: Callable[[dict], None] | None = None) -> None:
        self.evaluate = evaluate
        self.on_point = on_point  # receives each point as it is recorded (the run's loggers: unizoo.eval.experiment_log)
        self.points: list[dict[str, Any]] = []
        self.steps_before = 0  # optimiser steps of the finished stages
        self.seconds_before = 0.0  # training seconds of the finished stages
        self._stage: str | None = None
        self._stage_steps = 0  # steps of the last finished stage
        self._started: float | None = None  # when the running stage's training started
        self._evaluating = 0.0  # evaluation seconds inside the running stage

    def start_stage(self, stage: str) -> None:
        self._stage, self._started, self._evaluating = stage, time.perf_counter(), 0.0

    def finish_stage(self, steps: int) -> float:
        """The stage's training is over (evaluations after it are at its last step); returns its training seconds."""
        seconds = time.perf_counter() - self._started - self._evaluating
        self.steps_before += steps
        self.seconds_before += seconds
        self._stage_steps, self._started = steps, None
        return seconds

    def measure(self, phase: str, step: int | None = None, full: bool = True) -> dict:
        """Evaluate now and record the point; ``step`` counts within the running stage."""
        if self._started is not None:
            step = step or 0
            steps = self.steps_before + step
            seconds = self.seconds_before + time.perf_counter() - self._started - self._evaluating
        else:  # before training, or after a stage finished
            step, steps, seconds = self._stage_steps, self.steps_before, self.seconds_before
        started = time.perf_counter()
        with torch.random.fork_rng():
            scores = self.evaluate(phase, full)
        self._evaluating += time.perf_counter() - started
        self.points.append(
            {"phase": phase, "stage": self._stage, "step": step, "steps": steps, "train_seconds": round(seconds, 2), **scores}
        )
        if self.on_point is not None:
            self.on_point(self.points[-1])
        return scores

    def callbacks(self, stage: str, every_n_steps: int | None) -> list[Callback]:
        """The callback that evaluates every ``every_n_steps`` steps of ``stage`` (none when it is unset)."""
        return [PeriodicEvaluation(self, stage, every_n_steps)] if every_n_steps else []


class PeriodicEvaluation(Callback):
    """Evaluates every ``every_n_steps`` optimiser steps of a stage, short of its last step (the stage's own end evaluation)."""

    def __init__(self, curve: EvaluationCurve, stage: str, every_n_steps: int) -> None:
        if every_n_steps < 1:
            raise ValueError(f"evaluation.every_n_steps must be at least 1 or null, got {every_n_steps}")
        self.curve, self.stage, self.every_n_steps = curve, stage, every_n_steps
        self._last_step = 0  # with gradient accumulation, several batches end on one step

    def __getstate__(self) -> dict:
        # Spawned DDP workers get a pickled copy of the trainer: the curve (and the model
        # its evaluation holds) stays in the launching process, which evaluates after fit().
        return {**self.__dict__, "curve": None}

    def on_train_start(self, trainer, pl_module) -> None:
        if self.curve is None:
            rank_zero_warn(
                f"evaluation.every_n_steps={self.every_n_steps}: this stage trains in spawned DDP workers, which "
                "cannot reach the run's evaluation; it is evaluated after the stage only"
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.curve is None or not trainer.is_global_zero:
            return
        if step % self.every_n_steps == 0 and self._last_step < step < trainer.max_steps:
            self._last_step = step
            self.curve.measure(f"{self.stage}_step{step}", step, full=False)
