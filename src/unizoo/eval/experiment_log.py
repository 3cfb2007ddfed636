"""Evaluator scores and sample grids sent to a run's loggers, beside the losses the trainers log.

Every evaluation (before training, every ``evaluation.every_n_steps`` and after each stage)
becomes a point of the run's `EvaluationCurve`; `EvaluationLog` receives each point and
logs its scores as metrics at the point's step counted across stages (``generation/overall``,
``fid``, ...) and the grids that evaluation wrote (``samples_<phase>.png``) as images:
TensorBoard ``add_image``, W&B ``log_image``, MLflow an artifact under ``samples/``.
CSV keeps the scores only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from PIL import Image

# A curve point's bookkeeping, not scores.
_POINT_KEYS = ("phase", "stage", "step", "steps", "train_seconds")


def flat_scores(scores: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"generation": {"overall": 0.5}, "fid": 3.0}`` -> ``{"generation/overall": 0.5, "fid": 3.0}``: numbers only."""
    flat: dict[str, float] = {}
    for key, value in scores.items():
        if isinstance(value, Mapping):
            flat.update(flat_scores(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat


def log_scores(loggers: Iterable[Logger], scores: Mapping[str, float], step: int) -> None:
    """Numbers as metrics at ``step``, written out now (a killed run keeps what was logged)."""
    for logger in loggers:
        logger.log_metrics(dict(scores), step)
        logger.save()


def log_images(loggers: Iterable[Logger], name: str, path: Path, step: int) -> None:
    """The image file ``path`` (a PNG the run wrote) as image ``name`` at ``step``, where the logger holds images."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            pixels = np.asarray(Image.open(path).convert("RGB"))
            logger.experiment.add_image(name, pixels, step, dataformats="HWC")
            logger.experiment.flush()
        elif isinstance(logger, WandbLogger):
            logger.log_image(name, [str(path)], step=step)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path="samples")
        # CSV and other loggers: scores only.


def sample_grids(run_dir: Path, phase: str) -> list[Path]:
    """The grids an evaluation of ``phase`` wrote (with the EMA weights, and ``_raw`` with the trained ones)."""
    return [path for path in (run_dir / f"samples_{phase}.png", run_dir / f"samples_{phase}_raw.png") if path.is_file()]


class EvaluationLog:
    """``log(point)``: one evaluation point's scores and grids to ``logger``; ``close()`` at the end of the run."""

    def __init__(self, logger: Logger, run_dir: Path) -> None:
        self.logger, self.run_dir = logger, Path(run_dir)

    def __call__(self, point: Mapping[str, Any]) -> None:
        step = int(point["steps"])
        scores = flat_scores({key: value for key, value in point.items() if key not in _POINT_KEYS})
        log_scores([self.logger], scores, step)
        for path in sample_grids(self.run_dir, point["phase"]):
            log_images([self.logger], f"samples/{path.stem.removeprefix('samples_')}", path, step)

    def close(self) -> None:
        """Finish the logger's run (W&B: the run every stage logged into, so the next unizoo run starts its own)."""
        self.logger.finalize("success")
        if isinstance(self.logger, WandbLogger) and self.logger._experiment is not None:
            self.logger.experiment.finish()
        elif isinstance(self.logger, TensorBoardLogger) and self.logger._experiment is not None:
            self.logger.experiment.close()
