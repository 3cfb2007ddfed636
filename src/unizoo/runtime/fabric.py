"""Where the loops that are not the run's Trainer run: the pretraining of the tiny VAE, CLIP and pixel decoder.

These loops run inside `prepare()`, before a stage's Trainer exists, and used to be hand
loops pinned to the CPU. They now run through a Lightning `Fabric` on the run's
accelerator: `unizoo.training.train` sets it for the whole preparation
(`loops_on(recipe.trainer.accelerator, recipe.trainer.precision)`), so a run on a GPU
pretrains on that GPU, and `trainer.accelerator=cpu` keeps everything on the CPU. Outside a
run (a test, a notebook) they take the accelerator Lightning finds, in fp32.

Each loop asks for a precision of its own: its recipe block's (`precision: 32-true` for
the tiny VAE, whose round trip bf16 spoils), or `auto` for the run's. Under a launcher
that starts one process per GPU, each process pretrains on its own GPU (its LOCAL_RANK);
the cache keeps the first finished copy. The weights come back to the CPU when a loop
ends, so a cache entry is the same files whichever device wrote it.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lightning.fabric import Fabric

log = logging.getLogger(__name__)

FP32 = "32-true"
RUN_PRECISION = "auto"  # a loop's precision value meaning "the run's"


@dataclass(frozen=True)
class Placement:
    """The accelerator the run trains on (a Lightning name: auto, cpu, gpu, cuda, mps) and its precision."""

    accelerator: str = "auto"
    precision: str = FP32


_placement: ContextVar[Placement] = ContextVar("unizoo_loop_placement", default=Placement())


@contextmanager
def loops_on(accelerator: str, precision: str = FP32) -> Iterator[Placement]:
    """Within the block, pretraining loops run on `accelerator`; `precision` is what `auto` means for them."""
    placement = Placement(str(accelerator), str(precision))
    token = _placement.set(placement)
    try:
        yield placement
    finally:
        _placement.reset(token)


def placement() -> Placement:
    return _placement.get()


def loop_device(accelerator: str | None = None) -> torch.device:
    """The one device a loop of this process runs on, for the run's (or the given) accelerator.

    `auto` and `gpu` take this process's CUDA device where there is one (LOCAL_RANK under
    torchrun or Lightning's launcher, so processes on one machine do not share GPU 0). A device
    with its index (`cuda:1`, as `unizoo cache-targets --device` takes it) is that device.
    """
    accelerator = (accelerator or placement().accelerator).lower()
    if ":" in accelerator:
        return named_device(accelerator)
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    if accelerator in ("auto", "mps") and torch.backends.mps.is_available():
        return torch.device("mps")
    if accelerator in ("gpu", "cuda", "mps"):
        raise RuntimeError(f"trainer.accelerator={accelerator} but this machine has no such device")
    return torch.device("cpu")


def named_device(name: str) -> torch.device:
    """`cpu`, `cuda`, `cuda:1`, ... as a device this machine has; a `RuntimeError` naming the valid ones otherwise."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RuntimeError(f"{name!r} is not a device; valid: auto, cpu, cuda, cuda:<index>") from None
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= gpus:
        raise RuntimeError(f"{name} but this machine has {gpus} CUDA GPU(s); valid: auto, cpu"
                           + "".join(f", cuda:{index}" for index in range(gpus)))
    return device


def loop_precision(precision: str | None) -> str:
    """A loop's precision value with `auto` (or None) replaced by the run's."""
    return placement().precision if precision in (None, RUN_PRECISION) else str(precision)


def loop_fabric(precision: str | None = FP32) -> Fabric:
    """A single-device Fabric on the run's device, in `precision` (`auto`: the run's precision)."""
    # Imported here, not at the top: recipe composition imports this module, and Lightning's own import
    # (~5 s, most of it torchmetrics) would delay every recipe error by as much.
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import SingleDeviceStrategy

    device = loop_device()
    chosen = loop_precision(precision)
    accelerator = "cuda" if device.type == "cuda" else device.type
    return Fabric(accelerator=accelerator, strategy=SingleDeviceStrategy(device=device), precision=chosen)


@contextmanager
def on_loop_device(*modules: torch.nn.Module) -> Iterator[torch.device]:
    """Within the block, `modules` sit on the loop's device; after it, each is back on the device it was on.

    Back where it was, not on the CPU: frozen encoders a loop calls wait on the CPU between uses, but the model a
    periodic evaluation samples with in the middle of a stage is on the training device, and Lightning's next step
    expects it there, beside its batches and its optimiser's state.
    """
    device = loop_device()
    homes = [home_device(module) for module in modules]
    for module in modules:
        module.to(device)
    try:
        yield device
    finally:
        for module, home in zip(modules, homes):
            module.to(home)


def home_device(module: torch.nn.Module) -> torch.device:
    """The device of `module`'s first parameter (or buffer); the CPU for a module that has neither."""
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device


def optimise(fabric: Fabric, optimizer: torch.optim.Optimizer, loss: torch.Tensor, schedule=None) -> None:
    """One step of a loop: gradients zeroed, `loss` backpropagated through the Fabric (its precision), the update, the schedule."""
    optimizer.zero_grad(set_to_none=True)
    fabric.backward(loss)
    optimizer.step()
    if schedule is not None:
        schedule.step()


def describe(fabric: Fabric) -> str:
    """`cuda:0, 32-true`: where a loop ran, for its log line."""
    precision = getattr(fabric.strategy.precision, "precision", type(fabric.strategy.precision).__name__)
    return f"{fabric.device}, {precision}"
