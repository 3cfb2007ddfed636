"""The run's accelerator: which device `auto` means here, settings that cannot work on this machine, and what a GPU run turns on.

* `trainer.accelerator: auto` (the default trainer) takes the GPU where there is one; the
  log says which device it became and why.
* Settings that cannot work here (a GPU that is not there, zero devices) are refused before
  anything is built or pretrained, naming the key, the value and what would work.
* On CUDA, fp32 matrix products run on the tensor cores in TF32, and data loaders get
  worker processes with pinned memory (`num_workers: auto`), so the step never waits for
  the host to draw a batch.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from unizoo.errors import RecipeError
from unizoo.runtime.fabric import loop_device

log = logging.getLogger(__name__)

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
AUTO_WORKERS = "auto"
MAX_AUTO_WORKERS = 8  # beyond this, drawing or decoding a batch is not what a tiny model waits for


def _device_name() -> str:
    return torch.cuda.get_device_name(torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"


def check_trainer_settings(accelerator: Any, devices: Any) -> None:
    """Raise `RecipeError` for a `trainer.accelerator` or `trainer.devices` this machine cannot run."""
    name = str(accelerator).lower()
    if name not in ACCELERATORS:
        raise RecipeError(f"trainer.accelerator={accelerator!r} is not an accelerator unizoo runs on; valid choices: {', '.join(ACCELERATORS)}")
    if name in ("gpu", "cuda") and not torch.cuda.is_available():
        raise RecipeError(
            f"trainer.accelerator={accelerator} but this machine has no CUDA GPU that torch {torch.__version__} can use "
            f"(torch.cuda.is_available() is False{'; this torch is a CPU build' if torch.version.cuda is None else ''}). "
            "Use trainer.accelerator=auto (the GPU where there is one, else the CPU) or trainer.accelerator=cpu."
        )
    if name == "mps" and not torch.backends.mps.is_available():
        raise RecipeError(f"trainer.accelerator=mps but this machine has no Apple GPU; use trainer.accelerator=auto or cpu")
    if isinstance(devices, bool) or (isinstance(devices, int) and devices < 1 and devices != -1):
        raise RecipeError(
            f"trainer.devices={devices!r}: expected a number of devices of at least 1, -1 (all of them), 'auto', "
            "or a list of GPU indices such as [0, 1]"
        )
    if isinstance(devices, int) and devices > 1 and name in ("gpu", "cuda") and devices > torch.cuda.device_count():
        raise RecipeError(f"trainer.devices={devices} but this machine has {torch.cuda.device_count()} CUDA GPU(s)")


def describe_accelerator(accelerator: str) -> str:
    """`auto -> cuda (NVIDIA H200)` or `auto -> cpu (no CUDA GPU)`: what the run trains on, for the log."""
    device = loop_device(accelerator)
    if str(accelerator).lower() == "auto":
        why = _device_name() if device.type == "cuda" else ("no CUDA GPU" if device.type == "cpu" else device.type)
        return f"accelerator auto -> {device.type} ({why})"
    return f"accelerator {accelerator} ({_device_name() if device.type == 'cuda' else device.type})"


def use_tensor_cores(precision: str) -> str | None:
    """On CUDA, let fp32 matrix products use TF32 tensor cores (as PyTorch's 'high' precision); what was set, or None."""
    if loop_device().type != "cuda" or not str(precision).startswith("32"):
        return None
    torch.set_float32_matmul_precision("high")  # TF32 for CUDA matmuls and convolutions (10-bit mantissa)
    return "fp32 matrix products in TF32 on the tensor cores (torch.set_float32_matmul_precision('high'))"


def loader_workers(num_workers: int | str) -> int:
    """`num_workers: auto` -> 0 on the CPU (workers would take cores from the step), else a few per GPU process.

    Measured on a 2-core Xeon (`python -m benchmarks.run loop --loop-override data.num_workers=1`,
    2026-12-07): one worker, 10.1% loop overhead (blocks 4.3% to 29.4%), against 7.5% (3.6% to
    10.5%) without, the same hour: no gain from taking the batch off the main thread there.
    """
    if num_workers != AUTO_WORKERS:
        return int(num_workers)
    if loop_device().type == "cpu":
        return 0
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, min(MAX_AUTO_WORKERS, (os.cpu_count() or 2) // processes - 1))


def loader_options(num_workers: int | str) -> dict[str, Any]:
    """DataLoader keyword arguments for `num_workers` (int or auto): workers kept alive between epochs, pinned memory on CUDA."""
    workers = loader_workers(num_workers)
    return {
        "num_workers": workers,
        # Worker start-up costs more than drawing a batch, so keep workers alive between epochs.
        "persistent_workers": workers > 0,
        "pin_memory": loop_device().type == "cuda",
    }
