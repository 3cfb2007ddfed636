"""The Trainer of a stage and the callbacks every stage runs with, from the recipe: what makes a run survive.

* periodic, atomic checkpoints (`checkpoint.every_n_steps`), which `resume=` restarts from,
  with the loss logs written up to them;
* per-step seeding of the RNGs, so a resumed step draws what the uninterrupted one drew;
* a stop on non-finite losses, before they reach the weights;
* the generator's EMA (`ema.decay`), in stages that train the generator;
* the generator and the backbone's language model compiled while such a stage trains, where `compile`
  says so (unizoo.runtime.compilation);
* fault injection (`debug.*`), for tests.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from unizoo.components.strategies.stages import Stage
from unizoo.errors import RecipeError
from unizoo.runtime.compilation import AUTO, CompiledStage
from unizoo.runtime.progress import LossBar, PlainProgress
from unizoo.training.checkpoints import AtomicCheckpointIO, periodic_checkpoint, readable
from unizoo.training.ema import GeneratorEMA
from unizoo.training.faults import check_debug, fault_injection
from unizoo.training.loss_log import FlushLogsOnSave
from unizoo.training.model_summary import ParameterSummary
from unizoo.training.nonfinite import StopOnNonFiniteLoss
from unizoo.training.runs import stage_checkpoint
from unizoo.training.step_seeds import StepSeeding

DEFAULT_EVERY_N_STEPS = 500  # for run directories written before `checkpoint:` was a recipe block


def stage_callbacks(recipe: DictConfig, stage: Stage, stages: list[Stage], run_dir: Path) -> list[L.Callback]:
    checkpoints = Path(run_dir) / "checkpoints" / stage.name
    every = OmegaConf.select(recipe, "checkpoint.every_n_steps", default=DEFAULT_EVERY_N_STEPS)
    callbacks = [
        periodic_checkpoint(checkpoints, max(1, min(every, stage.steps))),
        FlushLogsOnSave(),
        StepSeeding(recipe.seed, stage.name),
        StopOnNonFiniteLoss(stage.name, checkpoints, earlier=_earlier_checkpoint(recipe, stage, stages, run_dir)),
        *fault_injection(OmegaConf.select(recipe, "debug"), run_dir, stage.name),
    ]
    if "generator" in stage.trainable:
        callbacks.append(GeneratorEMA())  # a no-op when the recipe has no EMA (ema.decay: null)
        callbacks.append(CompiledStage(OmegaConf.select(recipe, "compile", default=AUTO), stage.name))
    return callbacks


def check_stage_settings(recipe: DictConfig, stages: list[Stage]) -> None:
    """Raise `RecipeError` for a bad `checkpoint` or `debug` block, or a target cache beside a stage that trains the representation."""
    every = OmegaConf.select(recipe, "checkpoint.every_n_steps", default=DEFAULT_EVERY_N_STEPS)
    if not isinstance(every, int) or every < 1:
        raise RecipeError(f"checkpoint.every_n_steps={every!r}: expected a whole number of optimiser steps, at least 1")
    check_debug(OmegaConf.select(recipe, "debug"), [stage.name for stage in stages])
    training_representation = [stage.name for stage in stages if "representation" in stage.trainable]
    if OmegaConf.select(recipe, "targets") and training_representation:
        raise RecipeError(
            f"targets={recipe.targets}: the cache holds the representation's tokens as they were before training, but "
            f"stage {training_representation[0]!r} trains the representation (REPA-E), so they would go stale: "
            "run without targets (set targets=null)"
        )


def trainer_plugins() -> list:
    return [AtomicCheckpointIO()]


def progress_callbacks(recipe: DictConfig, stage: Stage, run_dir: Path) -> list[L.Callback]:
    """Plain progress lines where the output is not a terminal; on a terminal, a bar that reads the losses only when it redraws."""
    callbacks: list[L.Callback] = [PlainProgress(stage.name, recipe.progress_interval, Path(run_dir) / "train.log")]
    if OmegaConf.select(recipe, "trainer.enable_progress_bar", default=True) is not False:
        callbacks.append(LossBar(refresh_rate=max(1, int(OmegaConf.select(recipe, "trainer.log_every_n_steps", default=25)))))
    return callbacks


def stage_trainer(recipe: DictConfig, stage: Stage, stages: list[Stage], run_dir: Path, logger, callbacks=()) -> L.Trainer:
    """The Trainer of one stage: the recipe's trainer settings, the stage's length, and every stage's callbacks plus `callbacks`."""
    # unizoo's summary replaces Lightning's (unizoo.training.model_summary says why);
    # `trainer.enable_model_summary=false` still turns it off.
    summary = [ParameterSummary(stage.name)] if OmegaConf.select(recipe, "trainer.enable_model_summary", default=True) is not False else []
    return instantiate(
        recipe.trainer,
        max_steps=stage.steps,
        default_root_dir=str(run_dir),
        logger=logger,
        callbacks=[*stage_callbacks(recipe, stage, stages, run_dir), *progress_callbacks(recipe, stage, run_dir), *summary, *callbacks],
        plugins=trainer_plugins(),
        enable_model_summary=False,
    )


def _earlier_checkpoint(recipe: DictConfig, stage: Stage, stages: list[Stage], run_dir: Path) -> Path | None:
    """The checkpoint `stage` starts from: the previous stage's, else the recipe's init_checkpoint."""
    names = [s.name for s in stages]
    for earlier in reversed(names[: names.index(stage.name)]):
        if readable(stage_checkpoint(run_dir, earlier)):
            return stage_checkpoint(run_dir, earlier)
    init = OmegaConf.select(recipe, "init_checkpoint")
    return Path(init) if init else None
