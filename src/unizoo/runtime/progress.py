"""Plain progress lines when the output is not a terminal (a file, nohup, CI, SLURM).

Lightning's progress bar redraws one line of stdout with carriage returns: right on a
terminal, unreadable (or nothing until the stage ends) in a file. When stdout is not a
terminal, `PlainProgress` switches the bar off and writes, in its place on stdout and in
the run's train.log, one line every `interval` seconds of wall time and one when the
stage ends:

    [unizoo] generation: step 600/1500 (40%), loss 0.4127, generation 0.4127, 212.5 images/s, 1m52s left

On a terminal the bar stays and no lines are written. `LoopProgress` does the same for the
loops that are not a Trainer (pretraining): a bar on a terminal, plain lines in a file.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar

# Its own outputs (stdout and train.log), not the `unizoo` logger's: those go to stderr,
# and the lines belong where the bar would have been drawn.
log = logging.getLogger(__name__)
log.propagate = False
log.setLevel(logging.INFO)
CONSOLE_FORMAT = "[unizoo] %(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def batch_size(batch: Any) -> int:
    """The leading size of the first tensor in a batch (dicts, lists and tuples searched in order)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        if size := batch_size(value):
            return size
    return 0


def duration(seconds: float) -> str:
    """4 -> '4s', 135 -> '2m15s', 4000 -> '1h06m'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class PlainProgress(Callback):
    """Write `stage: step/total, losses, images/s, time left` every `interval` seconds when stdout is not a terminal.

    Lines go to stdout and to `log_file` (the run's train.log), from the process of rank 0
    (a spawned DDP worker included).
    """

    def __init__(self, stage: str, interval: float = 30.0, log_file: str | Path | None = None) -> None:
        if interval < 0:
            raise ValueError(f"progress_interval={interval!r}: seconds between progress lines, 0 or more")
        self.stage, self.interval, self.log_file = stage, float(interval), log_file
        self.active = False
        self.handlers: list[logging.Handler] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.active = not is_terminal(sys.stdout)
        if not self.active:
            return
        if trainer.progress_bar_callback is not None:
            trainer.progress_bar_callback.disable()  # its carriage-return redraws would fill the file
        if trainer.is_global_zero:
            self._open_outputs()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for handler in self.handlers:
            log.removeHandler(handler)
            handler.close()
        self.handlers = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = self.last_line = time.perf_counter()
        self.first_step, self.images, self.stage_images = trainer.global_step, 0, 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.active:
            return
        images = batch_size(batch) * trainer.world_size
        self.images += images
        self.stage_images += images
        if time.perf_counter() - self.last_line >= self.interval and trainer.is_global_zero:
            log.info(self.line(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.active and trainer.is_global_zero:
            log.info("%s, done in %s", self.line(trainer, finished=True), duration(time.perf_counter() - self.started))

    def line(self, trainer: L.Trainer, finished: bool = False) -> str:
        now = time.perf_counter()
        step, total = trainer.global_step, trainer.max_steps
        parts = [f"{self.stage}: step {step}/{total}" + (f" ({100 * step // total}%)" if total > 0 else "")]
        losses = {key.removeprefix("train/"): float(value) for key, value in trainer.callback_metrics.items() if key.startswith("train/")}
        for name in sorted(losses, key=lambda name: name != "loss"):  # the total first
            parts.append(f"{name} {losses[name]:.4f}")
        # Since the last line; the last line of a stage gives the stage's average.
        images, since = (self.stage_images, now - self.started) if finished else (self.images, now - self.last_line)
        if images and since > 0:
            parts.append(f"{images / since:.1f} images/s")
        done = step - self.first_step
        if not finished and done > 0 and total > step:
            parts.append(f"{duration((total - step) * (now - self.started) / done)} left")
        self.last_line, self.images = now, 0
        return ", ".join(parts)

    def _open_outputs(self) -> None:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter(CONSOLE_FORMAT))
        self.handlers = [console]
        if self.log_file is not None:
            file = logging.FileHandler(self.log_file)
            file.setFormatter(logging.Formatter(FILE_FORMAT))
            self.handlers.append(file)
        for handler in self.handlers:
            log.addHandler(handler)


class LoopProgress:
    """Progress of a loop that is not a Trainer (pretraining), by the same policy as `PlainProgress`.

    On a terminal, a tqdm bar on stderr; otherwise (a file, nohup, CI) a plain line on the
    `unizoo` logger every `interval` seconds and one at the end:

        [unizoo] pretraining VAE: step 400/850 (47%), reconstruction 0.0301, kl 88.2, 21.4 steps/s, 21s left

    `values` is called only when a line (or the bar's figures, at most once a second) is
    due: reading a loss with `.item()` waits for the device, so it is never done every step.
    """

    BAR_REFRESH = 1.0  # seconds between the bar's figures

    def __init__(self, name: str, total: int, interval: float = 30.0, stream: Any = None) -> None:
        self.name, self.total, self.interval = name, int(total), float(interval)
        self.stream = stream if stream is not None else sys.stderr
        self.step_count = 0
        self.started = self.last_line = time.perf_counter()
        self.bar = None
        if is_terminal(self.stream):
            from tqdm.auto import tqdm  # noqa: PLC0415 - only where a bar is drawn

            self.bar = tqdm(total=self.total, desc=name, dynamic_ncols=True, file=self.stream)

    def step(self, values: Callable[[], Mapping[str, float]] | None = None) -> None:
        """One step done; `values()` gives the figures to show (losses), read only when they are shown."""
        self.step_count += 1
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(1)
            if values is not None and now - self.last_line >= self.BAR_REFRESH:
                self.bar.set_postfix({key: f"{value:.4g}" for key, value in values().items()}, refresh=False)
                self.last_line = now
        elif now - self.last_line >= self.interval:
            logging.getLogger("unizoo").info(self.line(values() if values is not None else {}))
            self.last_line = now

    def close(self, values: Mapping[str, float] | None = None) -> None:
        """The loop ended: the bar closes; in a file, a last line with the final figures."""
        if self.bar is not None:
            if values:
                self.bar.set_postfix({key: f"{value:.4g}" for key, value in values.items()}, refresh=False)
            self.bar.close()
        else:
            logging.getLogger("unizoo").info("%s, done in %s", self.line(values or {}), duration(time.perf_counter() - self.started))

    def line(self, values: Mapping[str, float]) -> str:
        elapsed = time.perf_counter() - self.started
        parts = [f"{self.name}: step {self.step_count}/{self.total}" + (f" ({100 * self.step_count // self.total}%)" if self.total else "")]
        parts += [f"{key} {value:.4g}" for key, value in values.items()]
        if self.step_count and elapsed > 0:
            parts.append(f"{self.step_count / elapsed:.1f} steps/s")
            if self.step_count < self.total:
                parts.append(f"{duration((self.total - self.step_count) * elapsed / self.step_count)} left")
        return ", ".join(parts)


class LossBar(TQDMProgressBar):
    """Lightning's bar for a terminal, redrawn every `refresh_rate` steps with the loss terms.

    The losses are logged without `prog_bar` (Lightning would convert them to numbers, a wait for
    the device, after every step); the bar reads them from the callback metrics only when it redraws.
    """

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        losses = {key.removeprefix("train/"): value for key, value in trainer.callback_metrics.items() if key.startswith("train/")}
        return {**metrics, **{name: f"{float(value):.4f}" for name, value in losses.items()}}
