"""Checkpoint files that survive a kill: written atomically, and the newest readable one found again.

A checkpoint is written to a temporary file next to its destination and renamed over
it, so a process killed during a save leaves the previous checkpoint intact (plus a
stray `.<name>.<pid>.tmp`, which nothing reads).
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

LAST = "last.ckpt"
_STEP_FILE = re.compile(r"step(\d+)\.ckpt")


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` to a temporary file in the same folder, flushed to disk, then renamed into place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_save(checkpoint, Path(path))


def atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)  # so the rename itself survives a power cut


def _fsync_directory(directory: Path) -> None:
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def readable(path: Path) -> bool:
    """Whether `path` is a complete `torch.save` file: its zip directory, written last, is there."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _step_files(directory: Path) -> list[tuple[int, Path]]:
    """`(N, step<N>.ckpt)` in `directory`, newest first."""
    if not directory.is_dir():
        return []
    found = ((_STEP_FILE.fullmatch(path.name), path) for path in directory.iterdir())
    return sorted(((int(match.group(1)), path) for match, path in found if match), reverse=True)


def newest_step(directory: Path) -> int | None:
    """The step of the newest `step<N>.ckpt` in `directory` (`last.ckpt` is written at the same step)."""
    steps = _step_files(directory)
    return steps[0][0] if steps else None


def last_good_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint in `directory`: `last.ckpt`, else `step<N>.ckpt` by N, newest first."""
    candidates = [directory / LAST, *(path for _, path in _step_files(directory))]
    return next((path for path in candidates if path.is_file() and readable(path)), None)


def periodic_checkpoint(directory: Path, every_n_steps: int) -> ModelCheckpoint:
    """`directory/last.ckpt` (and `step<N>.ckpt`) every `every_n_steps` optimiser steps."""
    if every_n_steps < 1:
        raise ValueError(f"checkpoint.every_n_steps must be at least 1, got {every_n_steps}")
    return ModelCheckpoint(
        dirpath=str(directory), filename="step{step}", auto_insert_metric_name=False,
        every_n_train_steps=every_n_steps, save_last=True,
    )
