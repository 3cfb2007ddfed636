"""The run directory: what `unizoo train` writes and what `unizoo sample` reads back.

    runs/<recipe>/<timestamp>/
        recipe.yaml            the composed recipe, resolved
        tokenizer/             the backbone's tokenizer (save_pretrained)
        checkpoints/<stage>/   periodic checkpoints during a stage (last.ckpt is the newest)
        checkpoints/<stage>.ckpt   the weights at the end of each stage
        samples_<stage>.png    a grid of samples for the fixed val prompts
        metrics.json           the evaluator's scores, untrained and after each stage, and their chance levels
        logs/                  CSV logs of the losses
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from unizoo.model import UnifiedModel
from unizoo.training.build import build_model
from unizoo.training.ema import use_ema_weights

log = logging.getLogger(__name__)

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.json"
TOKENIZER_DIR = "tokenizer"


def new_run_dir(root: str | Path, name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / name / stamp
    path, suffix = base, 1
    while path.exists():  # two runs in the same second (tests, sweeps)
        path = base.with_name(f"{stamp}-{suffix}")
        suffix += 1
    path.mkdir(parents=True)
    return path


def stage_checkpoint(run_dir: Path, stage: str) -> Path:
    return run_dir / "checkpoints" / f"{stage}.ckpt"


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> Path:
    """Written to a temporary file and renamed, so a kill mid-write leaves the previous scores."""
    path = run_dir / METRICS_FILE
    tmp = path.with_name(f".{METRICS_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, path)
    return path


def read_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def run_vocabulary(run_dir: str | Path) -> str:
    """Where a run's vocabulary can be read, for the warning."""
    saved = Path(run_dir) / TOKENIZER_DIR
    where = f"saved in {saved}/tokenizer.json; " if saved.is_dir() else ""
    return f"The vocabulary is {where}the recipe's backbone.tokenizer (`unizoo recipe`) says where it comes from."


def final_checkpoint(run_dir: Path) -> Path:
    """The checkpoint of the last stage that finished, by the recipe's stage order."""
    recipe = OmegaConf.load(run_dir / RECIPE_FILE)
    stages = [stage.name for stage in instantiate(recipe.strategy).stages]
    for stage in reversed(stages):
        if stage_checkpoint(run_dir, stage).is_file():
            return stage_checkpoint(run_dir, stage)
    raise FileNotFoundError(
        f"{run_dir} has no finished stage checkpoint (looked for {', '.join(str(stage_checkpoint(run_dir, s)) for s in stages)}); "
        "was the run interrupted? Its periodic checkpoints are under checkpoints/<stage>/last.ckpt."
    )


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None) -> tuple[DictConfig, UnifiedModel]:
    """The recipe and trained model of a run directory, in eval mode on the CPU."""
    run_dir = Path(run_dir)
    if not (run_dir / RECIPE_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} is not a unizoo run directory: it has no {RECIPE_FILE} (made by `unizoo train`)")
    recipe = OmegaConf.load(run_dir / RECIPE_FILE)
    tokenizer_dir = run_dir / TOKENIZER_DIR
    if tokenizer_dir.is_dir():
        # The tokenizer saved with the run, so sampling never depends on rebuilding it.
        recipe.backbone.tokenizer = {
            "_target_": "transformers.AutoTokenizer.from_pretrained",
            "pretrained_model_name_or_path": str(tokenizer_dir),
        }
    model = build_model(recipe)
    path = Path(checkpoint) if checkpoint else final_checkpoint(run_dir)
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict(state)
    if use_ema_weights(model):
        log.info("loaded %s (generator: its EMA weights)", path)
    else:
        log.info("loaded %s", path)
    return recipe, model.eval()
