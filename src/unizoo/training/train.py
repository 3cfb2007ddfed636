"""`train(recipe)`: one composed recipe -> one run directory. A study runner calls it per variant."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from unizoo.config.recipe_types import check_recipe_types
from unizoo.data.skip_report import SkippedSamplesLog, skipped_samples
from unizoo.data.target_memo import index_training_items
from unizoo.data.with_targets import attach_cached_targets
from unizoo.eval.chance import CHANCE_IMAGES, chance_levels, format_scores
from unizoo.eval.evaluation import CaptionEvaluation, RoundTripEvaluation, SampleEvaluation, first_items
from unizoo.eval.experiment_log import EvaluationLog
from unizoo.eval.generation_evaluator import generation_evaluator, headline_score
from unizoo.eval.periodic_evaluation import EvaluationCurve
from unizoo.eval.sample_statistics import headline_space, sample_statistics
from unizoo.eval.search_evaluation import search_evaluation
from unizoo.model import UnifiedModel
from unizoo.runtime.accelerator import check_trainer_settings, describe_accelerator, use_tensor_cores
from unizoo.runtime.compilation import compile_seconds
from unizoo.runtime.fabric import loops_on, on_loop_device
from unizoo.runtime.library_chatter import quiet_library_chatter
from unizoo.runtime.precision import describe_precision
from unizoo.text.unknown_words import warn_unknown_words
from unizoo.training.build import build_model
from unizoo.training.ema import ema_weights, has_updates, load_weights, scores_with_and_without_ema
from unizoo.training.launch import is_primary, share_run_dir, shared_run_dir
from unizoo.training.resume import fresh_plan, resume_plan
from unizoo.training.run_loggers import logger_factory
from unizoo.training.runs import RECIPE_FILE, TOKENIZER_DIR, read_metrics, run_vocabulary, stage_checkpoint, write_metrics
from unizoo.training.sharding import model_to_fit, take_trained_weights
from unizoo.training.stage_callbacks import check_stage_settings, stage_trainer
from unizoo.training.stage_weights import groups_only_later_stages_train, state_for_later_stages
from unizoo.training.throughput import stage_throughput
from unizoo.training.until_flat import StopWhenFlat, check_until_flat, stage_scores, verdict

log = logging.getLogger(__name__)

# The parameter group of a representation that trains (REPA-E's VAE): its round trip is measured again after such a stage.
REPRESENTATION_GROUP = "representation"

# A run's log keeps Lightning's information and loses what a user cannot act on (eval-mode frozen
# towers, mid-epoch resumes, LeafSpec's deprecation, hosted-logger tips).
quiet_library_chatter()


def train(recipe: DictConfig, run_dir: Path | None = None, resume: bool = False) -> Path:
    """Train every stage of `recipe`'s strategy, evaluating before and after; returns the run directory.

    `resume`: `run_dir` is an interrupted run of `recipe`; continue it (see unizoo.training.resume).
    """
    # What trains outside a stage's Trainer (the tiny VAE, CLIP, pixel decoder: unizoo.runtime.fabric)
    # runs on the trainer's accelerator too, `precision: auto` there means the trainer's, and an
    # attention kernel the recipe names is probed on that device and dtype when the model is built.
    with loops_on(recipe.trainer.accelerator, recipe.trainer.precision):
        return _train(recipe, run_dir, resume)


def _train(recipe: DictConfig, run_dir: Path | None, resume: bool) -> Path:
    started = time.perf_counter()
    check_recipe_types(recipe)  # a wrong-typed value is named before anything is built
    check_trainer_settings(recipe.trainer.accelerator, recipe.trainer.devices)  # a GPU that is not there, 0 devices
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    # Build first: a recipe that does not build leaves no empty run directory behind.
    datamodule = instantiate(recipe.data, _convert_="all")
    datamodule.setup("fit")  # data on disk is read (and refused, if unusable) before a run directory exists
    model = build_model(recipe)
    strategy = instantiate(recipe.strategy, _convert_="all")
    stages = _stages_to_run(strategy, recipe.start_stage, recipe.init_checkpoint)
    check_stage_settings(recipe, stages)  # also: no target cache where a stage trains the representation
    check_until_flat(stages, recipe.evaluation.get("every_n_steps"))  # a stage that trains until flat needs its curve
    headline_space(recipe, datamodule)  # evaluation.features=shapes_classifier on data without scene labels: refused now
    if attach_cached_targets(datamodule, recipe) is None:  # targets=DIR: batches carry pre-extracted targets (checked here)
        index_training_items(datamodule)  # else a frozen representation's tokens are kept after their first encoding
    make_logger = logger_factory(recipe)  # recipes/logger/: a missing package is named before anything trains

    # Launched as several processes, every one trains but only the primary writes (unizoo.training.launch).
    primary = is_primary()
    run_dir = shared_run_dir(recipe.run_root, recipe.name, run_dir or OmegaConf.select(recipe, "run_dir"), resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    if primary and not resume:
        OmegaConf.save(recipe, run_dir / RECIPE_FILE, resolve=True)
    handler = _log_to_file(run_dir / "train.log") if primary else logging.NullHandler()
    unshare_run_dir = share_run_dir(run_dir)
    evaluation_log = None
    try:
        log.info("run directory: %s", run_dir)

        model.prepare(datamodule)
        datamodule.setup("validate")
        if recipe.init_checkpoint:
            _load_weights(model, recipe.init_checkpoint, groups_only_later_stages_train(strategy.stages, stages))
        if primary:
            model.backbone.save_tokenizer(run_dir / TOKENIZER_DIR)
        log.info("trainer: %s, %s", describe_accelerator(recipe.trainer.accelerator), describe_precision(recipe.trainer))
        if tensor_cores := use_tensor_cores(recipe.trainer.precision):
            log.info("trainer: %s", tensor_cores)
        log.info("strategy %s: %s", strategy.name, ", ".join(f"{s.name} ({s.steps} steps)" for s in stages))

        evaluator = generation_evaluator(recipe, datamodule)  # exact (shapes), caption-image agreement, or both
        chance = real = None  # only the primary process evaluates, so only it measures the levels scores are read against
        if primary:
            with torch.random.fork_rng(devices=[]):  # reading val images must not move training's random stream
                images, captions = first_items(datamodule.val_dataloader(), CHANCE_IMAGES)
            chance = chance_levels(evaluator, captions, images)
            log.info("chance levels (%d val images scored against other images' prompts): %s", len(captions), format_scores(chance))
            real = evaluator(captions, images)
            log.info("real val images scored against their own captions (the ceiling): %s", format_scores(real))
        # Scores and sample grids also go to the run's logger (its "evaluation" version), at steps counted across stages.
        evaluation_log = EvaluationLog(make_logger(run_dir, "evaluation"), run_dir) if primary else None
        evaluate, feature_spaces = _evaluations(recipe, datamodule, model, run_dir, chance, evaluator)
        curve = EvaluationCurve(evaluate, on_point=evaluation_log)
        start = "untrained" if not recipe.init_checkpoint else "start"
        metrics = {"recipe": recipe.name, "run_dir": str(run_dir), "chance": chance, "real": real, **(read_metrics(run_dir) if resume else {})}
        if feature_spaces:  # what FID and diversity are measured in (with the shapes classifier's held-out accuracy)
            metrics["features"] = feature_spaces
        every_n_steps = recipe.evaluation.get("every_n_steps")
        score = headline_score(datamodule)
        round_trip = None
        if primary:
            images, captions = first_items(datamodule.val_dataloader(), recipe.evaluation.prompts)
            round_trip = RoundTripEvaluation(images, captions, evaluator, score=headline_score(datamodule))
        if primary and "representation" not in metrics:
            # The ceiling any generator of this representation can reach, before any stage trains it.
            metrics["representation"] = round_trip(model.representation, run_dir / "round_trip.png")
        if primary and start not in metrics:
            metrics[start] = curve.measure(start)
            write_metrics(run_dir, metrics)

        for part in resume_plan(run_dir, stages, metrics) if resume else fresh_plan(stages):
            stage = part.stage
            if part.weights:
                _load_weights(model, part.weights)
            model.set_stage(stage)
            stage_started = time.perf_counter()
            stopper = None
            if part.train:
                # After the periodic evaluation, at the same steps: a stage with until_flat ends once its curve is flat.
                stopper = StopWhenFlat(stage, lambda: curve.points, score, every_n_steps) if stage.until_flat else None
                trainer = stage_trainer(recipe, stage, stages, run_dir, make_logger(run_dir, stage.name),
                                        [*curve.callbacks(stage.name, every_n_steps), *([stopper] if stopper else []), SkippedSamplesLog()])
                fitted = model_to_fit(model, trainer)  # a copy where the trainer shards it (trainer=fsdp)
                curve.start_stage(stage.name)
                trainer.fit(fitted, datamodule=datamodule, ckpt_path=part.resume_from)
                trained_steps = trainer.global_step  # the stage's steps, or fewer where it stopped flat
                if memo := fitted.target_memo.summary():
                    log.info("%s", memo)
                training_seconds = curve.finish_stage(trained_steps)
                # The whole state (optimiser, loops, callbacks), as the periodic checkpoints hold; said, not defaulted,
                # which Lightning would log as "`weights_only` was not set".
                trainer.save_checkpoint(stage_checkpoint(run_dir, stage.name), weights_only=False)
                take_trained_weights(model, fitted)
            if primary:
                metrics[stage.name] = curve.measure(stage.name)
                if REPRESENTATION_GROUP in stage.trainable:  # REPA-E: the ceiling moved with the representation
                    trained = round_trip(model.representation, run_dir / f"round_trip_{stage.name}.png")
                    metrics.setdefault("representation_after", {})[stage.name] = trained
                    metrics[stage.name]["round_trip"] = trained["round_trip"]  # a column of a study's table
                if part.train:
                    metrics.setdefault("seconds", {})[stage.name] = round(time.perf_counter() - stage_started, 1)
                if part.train and part.resume_from is None:  # a resumed stage's speed would mix two processes' steps
                    metrics.setdefault("training", {})[stage.name] = stage_throughput(
                        model, trainer, recipe.data.batch_size, trained_steps, training_seconds, compile_seconds(trainer)
                    )
                if part.train and stage.until_flat is not None:
                    scores = [*stage_scores(curve.points, stage.name, score), metrics[stage.name]["generation"][score]]
                    converged = verdict(stage.until_flat, scores, stopper.stopped_at, trained_steps)
                    metrics.setdefault("converged", {})[stage.name] = converged
                    log.info("stage %s: %s at step %d (until_flat: window %d, min_gain %g, max_steps %d)", stage.name,
                             converged["state"], converged["step"], stage.until_flat.window, stage.until_flat.min_gain,
                             stage.until_flat.max_steps)
                metrics["curve"] = curve.points
                metrics.setdefault("data", {})["skipped"] = skipped_samples(datamodule)
                write_metrics(run_dir, metrics)

        metrics["seconds_total"] = round(time.perf_counter() - started, 1)
        if primary:
            write_metrics(run_dir, metrics)
        log.info("done in %.0f s: %s", metrics["seconds_total"], run_dir)
        return run_dir
    finally:
        if evaluation_log is not None:
            evaluation_log.close()
        # Runs in one process (tests, a study runner) must not log into each other's files.
        logging.getLogger("unizoo").removeHandler(handler)
        handler.close()
        unshare_run_dir()


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


def _load_weights(model: UnifiedModel, checkpoint: str | Path, untrained_groups: set[str] = frozenset()) -> None:
    """`checkpoint`'s weights, strictly except for new or reshaped tensors of `untrained_groups` (unizoo.training.stage_weights)."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"init_checkpoint={checkpoint!r} is not a file; stage checkpoints are RUN_DIR/checkpoints/<stage>.ckpt")
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    load_weights(model, state_for_later_stages(model, state, untrained_groups))
    log.info("weights from %s", path)


def _evaluations(recipe: DictConfig, datamodule, model: UnifiedModel, run_dir: Path, chance: dict, evaluator):
    """(`evaluate(phase, full) -> scores`, the feature spaces of FID and diversity or None): samples scored, and
    captions scored where the backbone reads images."""
    prompts = datamodule.prompts("val", recipe.evaluation.prompts)
    warn_unknown_words(model.backbone.tokenizer, prompts, run_vocabulary(run_dir))
    generation = SampleEvaluation(
        prompts=prompts,
        evaluator=evaluator,
        steps=recipe.evaluation.steps,
        guidance=recipe.evaluation.guidance,
        seed=recipe.evaluation.seed,
        chance=chance,
    )
    understanding = None
    if model.backbone.understands_images and getattr(datamodule, "has_exact_evaluator", True):  # it parses shapes captions
        images, truth = first_items(datamodule.val_dataloader(), recipe.evaluation.captions)
        warn_unknown_words(model.backbone.tokenizer, truth, run_vocabulary(run_dir), what="reference caption")
        understanding = CaptionEvaluation(images, truth, instantiate(recipe.understanding_evaluator))
    statistics = sample_statistics(recipe, datamodule)  # FID, diversity: None unless the recipe asks
    feature_spaces = {"headline": statistics.headline, **statistics.spaces} if statistics is not None else None
    searched = search_evaluation(recipe, datamodule, model, prompts, evaluator)  # None unless evaluation.search.method

    def evaluate(phase: str, full: bool = True) -> dict:
        """Scores of the model now; ``full`` (before and after stages) also writes grids and captions and measures diversity.

        With an EMA: "generation" scores its weights (what `unizoo sample` draws with), "generation_raw" the
        trained ones; FID and diversity are of the EMA's samples.
        """
        drawn = {}

        def score(suffix: str) -> dict:
            with on_loop_device(model):  # sampling on the run's accelerator (the model is on the CPU between stages)
                drawn[suffix] = generation.draw(model)
            return generation.score(drawn[suffix], run_dir / f"samples_{phase}{suffix}.png" if full else None)

        scores = scores_with_and_without_ema(model, score)
        if statistics is not None:
            with ema_weights(model) if has_updates(model) else contextlib.nullcontext():
                scores.update(statistics(model, drawn[""], full))
        if understanding is not None:
            scores["understanding"] = understanding(model, run_dir / f"captions_{phase}.txt" if full else None)
        if searched is not None and full:
            with on_loop_device(model), ema_weights(model) if has_updates(model) else contextlib.nullcontext():
                scores["search"] = searched(model)
        return scores

    return evaluate, feature_spaces


def _log_to_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("unizoo").addHandler(handler)
    return handler
