"""The per-step loss log (`logs/<stage>/metrics.csv`) of a run that is killed and resumed.

Lightning's CSV logger deletes an existing `metrics.csv` when it starts and writes its
rows only every 100 steps. Here the log is written with every checkpoint, a resumed
stage first drops the rows logged after its checkpoint (the resumed run logs those steps
again) and then appends: the log of a resumed run reads as the uninterrupted run's.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

METRICS_CSV = "metrics.csv"


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Keep the rows of an earlier process of this stage, and their columns.
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])


class AppendingCSVLogger(CSVLogger):
    """`CSVLogger` that continues the `metrics.csv` it finds instead of deleting it."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class FlushLogsOnSave(L.Callback):
    """Write the loggers' buffered rows with every checkpoint, so the losses up to it survive a kill with it."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            logger.save()


def forget_logged_steps(log: Path, step: int) -> None:
    """Drop the rows of `log` from `step` on: a run resumed at `step` logs those steps again."""
    if not log.is_file():
        return
    with open(log, newline="") as file:
        header, *rows = list(csv.reader(file))
    column = header.index("step")
    kept = [row for row in rows if int(row[column]) < step]
    tmp = log.with_name(f".{log.name}.tmp")
    with open(tmp, "w", newline="") as file:
        csv.writer(file).writerows([header, *kept])
    os.replace(tmp, log)
