"""Where a run logs: the recipe group ``logger`` (recipes/logger/) picks CSV, TensorBoard, W&B or MLflow.

A choice is a factory ``(run_dir, version) -> Lightning logger``, composed with
``_partial_: true`` so the recipe holds only its settings: the run calls it once per
stage (``version`` = the stage's name, whose trainer logs the losses) and once for the
evaluations (``version="evaluation"``: scores and sample grids, `unizoo.eval.experiment_log`).
Keys a factory does not name go to the Lightning logger it returns (and are checked
against its signature by `unizoo.config.recipe_types`).

TensorBoard, W&B and MLflow are optional packages (``pip install "unizoo[loggers]"``); a
recipe that picks a missing one is refused before anything is built or trained.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from unizoo.errors import RecipeError
from unizoo.pretraining.cache import content_hash
from unizoo.training.loss_log import AppendingCSVLogger

# A recipe written before the group existed (a resumed run's recipe.yaml) logs as it did then.
DEFAULT = {"_target_": "unizoo.training.run_loggers.csv", "_partial_": True}

MakeLogger = Callable[[Path, str], Logger]

# By design (see `wandb`): every stage's logger joins the W&B run the first one started.
warnings.filterwarnings("ignore", message="There is a wandb run already in progress")


def _needs(package: str) -> Callable:
    """Mark a factory with the optional package its logger needs, so a recipe can be checked before it runs."""

    def mark(factory: Callable) -> Callable:
        factory.package = package
        return factory

    return mark


def csv(run_dir: str, version: str, **options: Any) -> AppendingCSVLogger:
    """``<run_dir>/logs/<version>/metrics.csv``, continued (not overwritten) by a resumed run."""
    return AppendingCSVLogger(run_dir, name="logs", version=version, **options)


@_needs("tensorboard")
def tensorboard(run_dir: str, version: str, name: str = "tensorboard", **options: Any) -> TensorBoardLogger:
    """Event files in ``<run_dir>/<name>/<version>/`` (``tensorboard --logdir runs`` shows every run)."""
    return TensorBoardLogger(run_dir, name=name, version=version, **options)


@_needs("wandb")
def wandb(run_dir: str, version: str, project: str = "unizoo", offline: bool = True, **options: Any) -> WandbLogger:
    """One W&B run per unizoo run, in ``<run_dir>/wandb/``; each stage and the evaluations log under their
    own prefix (``generation-train/loss``, ``evaluation-generation/overall``).

    The id is a hash of the run directory, so a resumed run continues its W&B run when synced.
    """
    run = Path(run_dir).resolve()
    return WandbLogger(
        name=f"{run.parent.name}/{run.name}", save_dir=run_dir, id=content_hash(str(run)), project=project,
        offline=offline, prefix=version, **options,
    )


@_needs("mlflow")
def mlflow(run_dir: str, version: str, experiment_name: str = "unizoo", tracking_uri: str | None = None,
           **options: Any) -> MLFlowLogger:
    """An MLflow run per stage (and one for the evaluations), named by ``version`` and tagged with the run
    directory. ``tracking_uri`` null: a local store in the run directory, ``mlflow.db`` with the artifacts
    in ``mlartifacts/`` (SQLite, not MLflow's ``file:`` store, which MLflow 3 refuses unless
    ``MLFLOW_ALLOW_FILE_STORE=true``: it is in maintenance mode)."""
    tags = {"unizoo.run_dir": str(run_dir), **(options.pop("tags", None) or {})}
    if tracking_uri is None:
        run = Path(run_dir).resolve()
        tracking_uri = f"sqlite:///{run / 'mlflow.db'}"
        options.setdefault("artifact_location", (run / "mlartifacts").as_uri())
    return MLFlowLogger(experiment_name=experiment_name, run_name=version, tracking_uri=tracking_uri, tags=tags, **options)


def logger_factory(recipe: DictConfig) -> MakeLogger:
    """``make_logger(run_dir, version)`` for the recipe's ``logger``; refuses a logger whose package is missing."""
    config = OmegaConf.select(recipe, "logger") or OmegaConf.create(DEFAULT)
    factory = instantiate(config, _convert_="all")
    package = getattr(getattr(factory, "func", factory), "package", None)
    if package is not None and importlib.util.find_spec(package) is None:
        choice = getattr(getattr(factory, "func", factory), "__name__", package)
        raise RecipeError(
            f"logger={choice} needs the Python package '{package}', which is not installed. Install the optional "
            f"loggers with `pip install \"unizoo[loggers]\"` (from a checkout: `pip install -e \".[loggers]\"`), or "
            "choose another logger: logger=csv needs nothing."
        )
    return lambda run_dir, version: factory(run_dir=str(run_dir), version=version)
