"""Distribution scores of a run's samples beside the evaluator's: FID against val images, and diversity.

Both are off for a plain `unizoo train` (they need the CLIP tower's features; the
study turns them on): ``evaluation.fid`` and ``evaluation.diversity.prompts`` in the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
from omegaconf import DictConfig

from unizoo.eval.diversity import SampleDiversity
from unizoo.eval.evaluation import first_items
from unizoo.eval.features import image_features
from unizoo.eval.frechet import FrechetDistance
from unizoo.eval.generation_evaluator import has_exact_evaluator
from unizoo.model import UnifiedModel


@dataclass
class SampleStatistics:
    """``stats(model, images, full) -> {"fid": ..., "diversity": ...}``; diversity (extra samples) only when ``full``."""

    frechet: FrechetDistance | None
    diversity: SampleDiversity | None
    steps: int | None = None
    guidance: float | None = None

    def __call__(self, model: UnifiedModel, images: torch.Tensor, full: bool = True) -> dict[str, float]:
        scores = {}
        if self.frechet is not None:
            scores["fid"] = self.frechet(images)
        if self.diversity is not None and full:
            scores["diversity"] = self.diversity(
                lambda prompts, seed: model.generate(prompts, steps=self.steps, guidance=self.guidance, seed=seed)
            )
        return scores


def sample_statistics(recipe: DictConfig, datamodule: L.LightningDataModule) -> SampleStatistics | None:
    """The recipe's FID and diversity evaluation, or None where both are off."""
    evaluation = recipe.evaluation
    # Data without an exact evaluator is judged by distribution scores: FID is always on for it.
    fid = bool(evaluation.get("fid", False)) or not has_exact_evaluator(datamodule)
    diversity = evaluation.get("diversity") or {}
    diversity_prompts = int(diversity.get("prompts") or 0)
    if not fid and not diversity_prompts:
        return None
    # Forked: building the tower (from_pretrained draws initial weights) must not move the
    # training's random stream, so turning these scores on never changes what is trained.
    with torch.random.fork_rng():
        features = image_features(evaluation.features, datamodule)
        frechet = None
        if fid:
            real, _ = first_items(datamodule.val_dataloader(), evaluation.prompts)
            frechet = FrechetDistance(features, real)
    sampler = None
    if diversity_prompts:
        prompts = datamodule.prompts("val", diversity_prompts)
        sampler = SampleDiversity(prompts, int(diversity.get("samples", 4)), features, seed=evaluation.seed + 1)
    return SampleStatistics(frechet, sampler, evaluation.steps, evaluation.guidance)
