"""`train(recipe)`: one composed recipe -> one run directory. A study runner calls it per variant."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from unizoo.build import build_model
from unizoo.eval.chance import CHANCE_IMAGES, chance_levels, format_scores
from unizoo.evaluation import CaptionEvaluation, RoundTripEvaluation, SampleEvaluation, first_items
from unizoo.model import UnifiedModel
from unizoo.periodic_evaluation import EvaluationCurve
from unizoo.progress import PlainProgress
from unizoo.recipe_types import check_recipe_types
from unizoo.runs import RECIPE_FILE, TOKENIZER_DIR, new_run_dir, stage_checkpoint, write_metrics
from unizoo.sample_statistics import sample_statistics
from unizoo.throughput import stage_throughput
from unizoo.vocabulary import run_vocabulary, warn_unknown_words

log = logging.getLogger(__name__)

# Frozen components (the VAE, CLIP towers) stay in eval mode on purpose.
warnings.filterwarnings("ignore", message=r"Found .* module\(s\) in eval mode")


def train(recipe: DictConfig, run_dir: Path | None = None) -> Path:
    """Train every stage of `recipe`'s strategy, evaluating before and after; returns the run directory."""
    started = time.perf_counter()
    check_recipe_types(recipe)  # a wrong-typed value is named before anything is built
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    # Build first: a recipe that does not build leaves no empty run directory behind.
    datamodule = instantiate(recipe.data, _convert_="all")
    model = build_model(recipe)
    strategy = instantiate(recipe.strategy, _convert_="all")
    stages = _stages_to_run(strategy, recipe.start_stage, recipe.init_checkpoint)

    run_dir = Path(run_dir) if run_dir else new_run_dir(recipe.run_root, recipe.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(recipe, run_dir / RECIPE_FILE, resolve=True)
    handler = _log_to_file(run_dir / "train.log")
    try:
        log.info("run directory: %s", run_dir)

        model.prepare(datamodule)
        datamodule.setup("validate")
        if recipe.init_checkpoint:
            _load_weights(model, recipe.init_checkpoint)
        model.backbone.save_tokenizer(run_dir / TOKENIZER_DIR)
        log.info("strategy %s: %s", strategy.name, ", ".join(f"{s.name} ({s.steps} steps)" for s in stages))

        with torch.random.fork_rng(devices=[]):  # reading val images must not move training's random stream
            images, captions = first_items(datamodule.val_dataloader(), CHANCE_IMAGES)
        chance = chance_levels(instantiate(recipe.evaluator), captions, images)
        log.info("chance levels (%d val images scored against other images' prompts): %s", len(captions), format_scores(chance))
        curve = EvaluationCurve(_evaluations(recipe, datamodule, model, run_dir, chance))
        start = "untrained" if not recipe.init_checkpoint else "start"
        metrics = {"recipe": recipe.name, "run_dir": str(run_dir), "chance": chance}
        # The ceiling any generator of this representation can reach: frozen, so measured once.
        images, captions = first_items(datamodule.val_dataloader(), recipe.evaluation.prompts)
        metrics["representation"] = RoundTripEvaluation(images, captions, instantiate(recipe.evaluator))(model.representation, run_dir / "round_trip.png")
        metrics[start] = curve.measure(start)
        write_metrics(run_dir, metrics)

        for stage in stages:
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
                    ),
                    PlainProgress(stage.name, recipe.progress_interval, run_dir / "train.log"),  # when output is not a terminal
                    *curve.callbacks(stage.name, recipe.evaluation.get("every_n_steps")),
                ],
            )
            curve.start_stage(stage.name)
            trainer.fit(model, datamodule=datamodule)
            training_seconds = curve.finish_stage(stage.steps)
            trainer.save_checkpoint(stage_checkpoint(run_dir, stage.name))
            if trainer.is_global_zero:
                metrics[stage.name] = curve.measure(stage.name)
                metrics.setdefault("seconds", {})[stage.name] = round(time.perf_counter() - stage_started, 1)
                metrics.setdefault("training", {})[stage.name] = stage_throughput(
                    model, trainer, recipe.data.batch_size, stage.steps, training_seconds
                )
                metrics["curve"] = curve.points
                write_metrics(run_dir, metrics)

        metrics["seconds_total"] = round(time.perf_counter() - started, 1)
        write_metrics(run_dir, metrics)
        log.info("done in %.0f s: %s", metrics["seconds_total"], run_dir)
        return run_dir
    finally:
        # Runs in one process (tests, a study runner) must not log into each other's files.
        logging.getLogger("unizoo").removeHandler(handler)
        handler.close()


def _stages_to_run(strategy, start_stage: str | None, init_checkpoint: str | None) -> list:
    """All stages, or those from `start_stage` on (which needs the earlier stages' weights)."""
    if start_stage is None:
        return list(strategy.stages)
    if not init_checkpoint:
        raise FileNotFoundError(
            f"start_stage={start_stage!r} skips earlier stages, so it needs their weights: set "
            "init_checkpoint=RUN_DIR/checkpoints/<earlier stage>.ckpt"
        )
    names = [stage.name for stage in strategy.stages]
    if start_stage not in names:
        raise FileNotFoundError(f"start_stage={start_stage!r} is not a stage of strategy {strategy.name!r}; stages: {', '.join(names)}")
    return list(strategy.stages[names.index(start_stage) :])


def _load_weights(model: UnifiedModel, checkpoint: str) -> None:
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"init_checkpoint={checkpoint!r} is not a file; stage checkpoints are RUN_DIR/checkpoints/<stage>.ckpt")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["state_dict"])
    log.info("weights from %s", path)


def _evaluations(recipe: DictConfig, datamodule, model: UnifiedModel, run_dir: Path, chance: dict):
    """`evaluate(phase) -> scores`: samples scored, and captions scored where the backbone reads images."""
    prompts = datamodule.prompts("val", recipe.evaluation.prompts)
    warn_unknown_words(model.backbone.tokenizer, prompts, run_vocabulary(run_dir))
    generation = SampleEvaluation(
        prompts=prompts,
        evaluator=instantiate(recipe.evaluator),
        steps=recipe.evaluation.steps,
        guidance=recipe.evaluation.guidance,
        seed=recipe.evaluation.seed,
        chance=chance,
    )
    understanding = None
    if model.backbone.understands_images:
        images, truth = first_items(datamodule.val_dataloader(), recipe.evaluation.captions)
        warn_unknown_words(model.backbone.tokenizer, truth, run_vocabulary(run_dir), what="reference caption")
        understanding = CaptionEvaluation(images, truth, instantiate(recipe.understanding_evaluator))
    statistics = sample_statistics(recipe, datamodule)  # FID, diversity: None unless the recipe asks

    def evaluate(phase: str, full: bool = True) -> dict:
        """Scores of the model now; ``full`` (before and after stages) also writes grids and captions and measures diversity."""
        images = generation.draw(model)
        scores = {"generation": generation.score(images, run_dir / f"samples_{phase}.png" if full else None)}
        if statistics is not None:
            scores.update(statistics(model, images, full))
        if understanding is not None:
            scores["understanding"] = understanding(model, run_dir / f"captions_{phase}.txt" if full else None)
        return scores

    return evaluate


def _log_to_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("unizoo").addHandler(handler)
    return handler
