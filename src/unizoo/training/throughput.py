"""What a stage cost: training images per second, wall time and parameter counts, for metrics.json."""

from __future__ import annotations

import lightning as L
from torch import nn


def stage_throughput(model: nn.Module, trainer: L.Trainer, batch_size: int, steps: int, seconds: float) -> dict:
    """``batch_size`` is per process: a step consumes it on every device, ``accumulate_grad_batches`` times."""
    images = steps * batch_size * trainer.world_size * trainer.accumulate_grad_batches
    return {
        "steps": steps,
        "train_seconds": round(seconds, 2),
        "images_per_s": round(images / seconds, 2) if seconds > 0 else None,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
    }
