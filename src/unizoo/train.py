"""`train(recipe)`: one composed recipe -> one run directory. A study runner calls it per variant."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from unizoo.build import build_model
from unizoo.evaluation import SampleEvaluation
from unizoo.runs import RECIPE_FILE, TOKENIZER_DIR, new_run_dir, stage_checkpoint, write_metrics

log = logging.getLogger(__name__)


def train(recipe: DictConfig, run_dir: Path | None = None) -> Path:
    """Train every stage of `recipe`'s strategy, evaluating before and after; returns the run directory."""
    started = time.perf_counter()
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    # Build first: a recipe that does not build leaves no empty run directory behind.
    datamodule = instantiate(recipe.data, _convert_="all")
    model = build_model(recipe)
    strategy = instantiate(recipe.strategy, _convert_="all")

    run_dir = Path(run_dir) if run_dir else new_run_dir(recipe.run_root, recipe.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(recipe, run_dir / RECIPE_FILE, resolve=True)
    _log_to_file(run_dir / "train.log")
    log.info("run directory: %s", run_dir)

    model.representation.prepare(datamodule)
    model.backbone.save_tokenizer(run_dir / TOKENIZER_DIR)
    log.info("strategy %s: %s", strategy.name, ", ".join(f"{s.name} ({s.steps} steps)" for s in strategy.stages))

    evaluation = SampleEvaluation(
        prompts=datamodule.prompts("val", recipe.evaluation.prompts),
        evaluator=instantiate(recipe.evaluator),
        steps=recipe.evaluation.steps,
        guidance=recipe.evaluation.guidance,
        seed=recipe.evaluation.seed,
    )
    metrics = {"recipe": recipe.name, "run_dir": str(run_dir), "untrained": evaluation(model, run_dir / "samples_untrained.png")}
    write_metrics(run_dir, metrics)

    for stage in strategy.stages:
        model.set_stage(stage)
        stage_started = time.perf_counter()
        trainer = instantiate(
            recipe.trainer,
            max_steps=stage.steps,
            default_root_dir=str(run_dir),
            logger=CSVLogger(str(run_dir), name="logs", version=stage.name),
            callbacks=[
                # Periodic, so a crash leaves the last good checkpoint of the stage.
                ModelCheckpoint(
                    dirpath=str(run_dir / "checkpoints" / stage.name),
                    filename="step{step}",
                    auto_insert_metric_name=False,
                    every_n_train_steps=max(1, min(500, stage.steps)),
                    save_last=True,
                )
            ],
        )
        trainer.fit(model, datamodule=datamodule)
        trainer.save_checkpoint(stage_checkpoint(run_dir, stage.name))
        if trainer.is_global_zero:
            metrics[stage.name] = evaluation(model, run_dir / f"samples_{stage.name}.png")
            metrics.setdefault("seconds", {})[stage.name] = round(time.perf_counter() - stage_started, 1)
            write_metrics(run_dir, metrics)

    metrics["seconds_total"] = round(time.perf_counter() - started, 1)
    write_metrics(run_dir, metrics)
    log.info("done in %.0f s: %s", metrics["seconds_total"], run_dir)
    return run_dir


def _log_to_file(path: Path) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("unizoo").addHandler(handler)
