"""`unizoo train resume=RUN_DIR`: continue an interrupted run exactly where its checkpoints left it.

What a run directory already holds decides what is left to do:

* a stage whose `checkpoints/<stage>.ckpt` is complete is finished: it is skipped, and
  only evaluated if `metrics.json` lacks its scores (the run died during evaluation);
* the first unfinished stage restarts from the newest complete checkpoint in
  `checkpoints/<stage>/` through Lightning's `ckpt_path` (model, EMA, optimiser, LR
  schedule, loop position; the data order and the RNGs follow from the step), or from
  the previous stage's weights if it saved none;
* later stages run as usual.

The recipe is the run's own `recipe.yaml`: changing it mid-run would make the result
neither the old recipe nor the new one, so only settings that leave the maths alone
(`trainer.*`, such as devices, and `debug.*`) may be overridden.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from unizoo.components.strategies.stages import Stage
from unizoo.errors import RecipeError
from unizoo.training.checkpoints import last_good_checkpoint, readable
from unizoo.training.loss_log import METRICS_CSV, forget_logged_steps
from unizoo.training.runs import RECIPE_FILE, stage_checkpoint

log = logging.getLogger(__name__)

OVERRIDABLE = ("trainer.", "debug.")
_ABSENT = object()


def resume_recipe(run_dir: Path, overrides: list[str]) -> DictConfig:
    """The run's recipe with `trainer.*` / `debug.*` overrides applied; any other override is refused."""
    recipe_file = Path(run_dir) / RECIPE_FILE
    if not recipe_file.is_file():
        raise FileNotFoundError(f"resume={run_dir}: not a unizoo run directory (it has no {RECIPE_FILE}, which `unizoo train` writes first)")
    refused = [o for o in overrides if not o.lstrip("+").startswith(OVERRIDABLE)]
    if refused:
        raise RecipeError(
            f"resume={run_dir} continues the run with its own recipe ({recipe_file}), so it takes only trainer "
            f"settings (trainer.<key>=..., e.g. trainer.devices=4) and debug.<key>=..., not {', '.join(refused)}. "
            "To train with a changed recipe, start a new run from the run's weights: "
            f"unizoo train ... init_checkpoint={Path(run_dir) / 'checkpoints' / '<stage>.ckpt'}"
        )
    recipe = OmegaConf.load(recipe_file)
    for override in overrides:
        key = override.partition("=")[0]
        if not key.startswith("+") and OmegaConf.select(recipe, key, default=_ABSENT) is _ABSENT:
            raise RecipeError(f"unknown recipe key {key!r} in override {override!r} for the recipe of {run_dir}; use +{key}=VALUE to add it")
        recipe = OmegaConf.merge(recipe, OmegaConf.from_dotlist([override.lstrip("+")]))
    return recipe


@dataclass(frozen=True)
class StageRun:
    """One stage's part in this process: train it (from `resume_from` if given), or only evaluate it.

    weights: a checkpoint whose weights the model takes first (the previous stage's, when
             the run continues after a finished stage; the stage's own, to evaluate it).
    """

    stage: Stage
    train: bool = True
    resume_from: Path | None = None
    weights: Path | None = None


def fresh_plan(stages: list[Stage]) -> list[StageRun]:
    return [StageRun(stage) for stage in stages]


def resume_plan(run_dir: Path, stages: list[Stage], metrics: dict[str, Any]) -> list[StageRun]:
    """What is left of `stages` in `run_dir`, given the scores already in `metrics` (updated with a record of the resume)."""
    plan: list[StageRun] = []
    finished: Path | None = None  # the newest finished stage's checkpoint
    for stage in stages:
        done = stage_checkpoint(run_dir, stage.name)
        if readable(done):
            finished = done
            if stage.name not in metrics:
                plan.append(StageRun(stage, train=False, weights=done))
            continue
        checkpoint = last_good_checkpoint(Path(run_dir) / "checkpoints" / stage.name)
        # Only the first stage this process trains needs weights from disk; later ones follow it.
        first = not any(entry.train for entry in plan)
        plan.append(StageRun(stage, resume_from=checkpoint, weights=finished if first and checkpoint is None else None))
        if checkpoint is not None:
            step = _step(checkpoint)
            metrics.setdefault("resumed", []).append({"stage": stage.name, "from": str(checkpoint), "step": step})
            forget_logged_steps(Path(run_dir) / "logs" / stage.name / METRICS_CSV, step)
    log.info(
        "resuming %s: %s", run_dir,
        "; ".join(
            f"{entry.stage.name}: " + ("evaluate" if not entry.train else f"from {entry.resume_from}" if entry.resume_from else "from its start")
            for entry in plan
        ) or "every stage is finished and evaluated",
    )
    return plan


def _step(checkpoint: Path) -> int:
    return int(torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)["global_step"])
