"""An exponential moving average of the generator's weights (as DiT and SiT train), for evaluation and sampling.

The average is a `torch.optim.swa_utils.AveragedModel` of the generator, attached to the
LightningModule as the submodule `generator_ema` so that it is part of every checkpoint
(and comes back from data-parallel workers with the weights). Its parameters never
train: the `GeneratorEMA` callback updates them after each optimiser step of a stage
that trains the generator.

The decay warms up as `min(decay, (1 + n) / (10 + n))` after `n` updates, so a short run
averages over its last few hundred steps instead of staying at its random start.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim.swa_utils import AveragedModel

from unizoo.errors import RecipeError
from unizoo.model import EMA_ATTRIBUTE as ATTRIBUTE


def warmed_up_decay(decay: float, updates: int) -> float:
    return min(decay, (1 + updates) / (10 + updates))


def _ema_update(decay: float, averaged: list[torch.Tensor], current: list[torch.Tensor], updates: int | torch.Tensor) -> None:
    """`AveragedModel`'s multi_avg_fn: averaged <- averaged + (1 - d) * (current - averaged), many tensors at once.

    `updates` is how many updates came before: a host integer from `update_average` (a tensor
    from `AveragedModel.update_parameters`, which reads it on the host).
    """
    weight = 1.0 - warmed_up_decay(decay, int(updates))
    # One call per kind: under trainer=fsdp parameters are sharded DTensors and buffers plain
    # tensors, which one foreach call cannot mix.
    for sharded in (False, True):
        pairs = [(a, c) for a, c in zip(averaged, current, strict=True) if isinstance(a, DTensor) is sharded]
        if pairs:
            torch._foreach_lerp_([a for a, _ in pairs], [c for _, c in pairs], weight)


def attach_ema(model: nn.Module, decay: float | None) -> None:
    """Give `model` a frozen running average of `model.generator` (nothing when `decay` is None)."""
    if decay is None:
        return
    if not 0.0 < decay < 1.0:
        raise RecipeError(f"ema.decay={decay}: expected a decay in (0, 1), e.g. 0.9999, or null for no EMA")
    # A partial of a module-level function: data-parallel workers receive the model pickled.
    average = AveragedModel(model.generator, multi_avg_fn=partial(_ema_update, decay), use_buffers=True)
    average.requires_grad_(False)
    model.add_module(ATTRIBUTE, average)


def generator_ema(model: nn.Module) -> AveragedModel | None:
    return getattr(model, ATTRIBUTE, None)


def has_updates(model: nn.Module) -> bool:
    average = generator_ema(model)
    return average is not None and int(average.n_averaged) > 0


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    return itertools.chain(module.parameters(), module.buffers())


@contextmanager
def ema_weights(model: nn.Module) -> Iterator[None]:
    """Within the block, `model.generator` holds the averaged weights; its own come back after."""
    if not has_updates(model):
        yield
        return
    average = generator_ema(model).module
    _swap(model.generator, average)
    try:
        yield
    finally:
        _swap(model.generator, average)


def _swap(a: nn.Module, b: nn.Module) -> None:
    with torch.no_grad():
        for x, y in zip(_tensors(a), _tensors(b), strict=True):
            held = x.detach().clone()
            x.copy_(y)
            y.copy_(held)


def load_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """`model.load_state_dict(state)`, also from checkpoints saved without an EMA (its average then starts afresh)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not key.startswith(f"{ATTRIBUTE}.") for key in missing):
        model.load_state_dict(state)  # strict: raises naming the keys
    elif missing:
        generator_ema(model).n_averaged.zero_()  # the next update copies the loaded generator


def use_ema_weights(model: nn.Module) -> bool:
    """Copy the average into `model.generator` for good (sampling a trained run); whether there was one."""
    if not has_updates(model):
        return False
    with torch.no_grad():
        for mine, averaged in zip(_tensors(model.generator), _tensors(generator_ema(model).module), strict=True):
            mine.copy_(averaged)
    return True


def scores_with_and_without_ema(model: nn.Module, score: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """`{"generation": score with the EMA weights, "generation_raw": score with the trained weights}`.

    `score(suffix)` evaluates the model as it is and names its outputs with `suffix`.
    Without an EMA (or before its first update) the two are one: `{"generation": score("")}`.
    """
    if not has_updates(model):
        return {"generation": score("")}
    raw = score("_raw")
    with ema_weights(model):
        return {"generation": score(""), "generation_raw": raw}


def update_average(model: nn.Module, updates: int) -> None:
    """One EMA update of `model.generator_ema` towards `model.generator`, after `updates` earlier ones.

    What `AveragedModel.update_parameters` does (the first update copies, later ones average),
    with the count kept on the host: that method reads `n_averaged` from the device twice per
    call, which makes every training step wait for the device to finish.
    """
    average = generator_ema(model)
    averaged = [t.detach() for t in _tensors(average.module)]
    current = [t.detach() for t in _tensors(model.generator)]
    if updates == 0:
        with torch.no_grad():
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)
    else:
        average.multi_avg_fn(averaged, current, updates)
    average.n_averaged.add_(1)  # on the device; checkpoints carry it


class GeneratorEMA(L.Callback):
    """Updates `model.generator_ema` after each optimiser step (add it to stages that train the generator)."""

    def __init__(self) -> None:
        self._updated_at: int | None = None
        self._updates = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._updated_at = trainer.global_step  # restored on resume: that step's update is in the checkpoint
        average = generator_ema(pl_module)
        # The one host read of the count per stage (a resumed or second stage continues the average).
        self._updates = int(average.n_averaged) if average is not None else 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        average = generator_ema(pl_module)
        # Accumulating batches end without a step: update once per optimiser step.
        if average is not None and trainer.global_step != self._updated_at:
            update_average(pl_module, self._updates)
            self._updates += 1
            self._updated_at = trainer.global_step
