"""What a stage cost: training images per second, wall time and parameter counts, for metrics.json."""

from __future__ import annotations

import lightning as L
from torch import nn


def stage_throughput(model: nn.Module, trainer: L.Trainer, batch_size: int, steps: int, seconds: float,
                     compile_seconds: float | None = None) -> dict:
    """``batch_size`` is per process: a step consumes it on every device, ``accumulate_grad_batches`` times.

    `compile_seconds`: the first step's compilation where the generator was compiled
    (`compile`), inside `seconds`; the rate without it is given beside the wall-clock one.
    """
    images = steps * batch_size * trainer.world_size * trainer.accumulate_grad_batches
    throughput = {
        "steps": steps,
        "train_seconds": round(seconds, 2),
        "images_per_s": round(images / seconds, 2) if seconds > 0 else None,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
    }
    if compile_seconds is not None:
        throughput["compile_seconds"] = round(compile_seconds, 2)
        compiled = seconds - compile_seconds
        throughput["images_per_s_after_compile"] = round(images / compiled, 2) if compiled > 0 else None
    return throughput
