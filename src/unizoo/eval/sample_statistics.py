"""Distribution scores of a run's samples beside the evaluator's: FID against val images, and diversity.

Both are off for a plain `unizoo train` (the study turns them on): ``evaluation.fid`` and
``evaluation.diversity.prompts`` in the recipe. They are measured in the features of
``evaluation.features``: the shapes classifier's (`unizoo.eval.shapes_classifier`, a network
of the data's scene labels that neither representation owns) where the data has scene
labels, else the tiny CLIP's image tower; FID also in every other space of
``evaluation.feature_spaces`` (`fid_clip` beside the classifier's `fid`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import lightning as L
import torch
from omegaconf import DictConfig

from unizoo.eval.diversity import SampleDiversity
from unizoo.eval.evaluation import first_items
from unizoo.eval.features import image_features
from unizoo.eval.frechet import FrechetDistance
from unizoo.eval.generation_evaluator import has_exact_evaluator
from unizoo.eval.shapes_classifier import has_scene_labels, without_scene_labels
from unizoo.errors import RecipeError
from unizoo.model import UnifiedModel

log = logging.getLogger(__name__)

AUTO, CLASSIFIER_SPACE, CLIP_SPACE = "auto", "shapes_classifier", "clip"


@dataclass
class SampleStatistics:
    """``stats(model, images, full) -> {"fid": ..., "fid_<space>": ..., "diversity": ...}``; diversity only when ``full``.

    `fid` is measured in the headline feature space (`evaluation.features`), `fid_<space>` in each
    other space of `evaluation.feature_spaces` the data allows; diversity in the headline space.
    """

    frechet: dict[str, FrechetDistance]
    diversity: SampleDiversity | None
    headline: str
    spaces: dict[str, dict]  # name -> what it is (and the classifier's held-out accuracy), for metrics.json
    steps: int | None = None
    guidance: float | None = None

    def __call__(self, model: UnifiedModel, images: torch.Tensor, full: bool = True) -> dict[str, float]:
        scores = {}
        for name, frechet in self.frechet.items():
            scores["fid" if name == self.headline else f"fid_{name}"] = frechet(images)
        if self.diversity is not None and full:
            scores["diversity"] = self.diversity(
                lambda prompts, seed: model.generate(prompts, steps=self.steps, guidance=self.guidance, seed=seed)
            )
        return scores


def feature_spaces(recipe: DictConfig) -> dict[str, DictConfig]:
    """The recipe's feature spaces by name; an older recipe's single `evaluation.features` node is the CLIP space."""
    evaluation = recipe.evaluation
    if isinstance(evaluation.get("features"), DictConfig):
        return {CLIP_SPACE: evaluation.features}
    return dict(evaluation.get("feature_spaces") or {})


def headline_space(recipe: DictConfig, datamodule: L.LightningDataModule) -> str:
    """`evaluation.features` resolved: `auto` is the shapes classifier where the data has scene labels, else CLIP."""
    evaluation = recipe.evaluation
    if isinstance(evaluation.get("features"), DictConfig):
        return CLIP_SPACE
    chosen = evaluation.get("features") or AUTO
    spaces = feature_spaces(recipe)
    if chosen == AUTO:
        chosen = CLASSIFIER_SPACE if has_scene_labels(datamodule) and CLASSIFIER_SPACE in spaces else CLIP_SPACE
    if chosen not in spaces:
        raise RecipeError(f"evaluation.features={chosen!r}: not a feature space of the recipe; valid: auto, {', '.join(spaces)}")
    if chosen == CLASSIFIER_SPACE and not has_scene_labels(datamodule):
        raise RecipeError(without_scene_labels(datamodule))
    return chosen


def sample_statistics(recipe: DictConfig, datamodule: L.LightningDataModule) -> SampleStatistics | None:
    """The recipe's FID and diversity evaluation, or None where both are off."""
    evaluation = recipe.evaluation
    # Data without an exact evaluator is judged by distribution scores: FID is always on for it.
    fid = bool(evaluation.get("fid", False)) or not has_exact_evaluator(datamodule)
    diversity = evaluation.get("diversity") or {}
    diversity_prompts = int(diversity.get("prompts") or 0)
    if not fid and not diversity_prompts:
        return None
    headline = headline_space(recipe, datamodule)
    names = [headline, *(name for name in feature_spaces(recipe) if name != headline)] if fid else [headline]
    extractors, spaces = {}, {}
    # Forked: building a tower or classifier (random initial weights) must not move the training's
    # random stream, so turning these scores on never changes what is trained.
    with torch.random.fork_rng():
        for name in names:
            if name == CLASSIFIER_SPACE and not has_scene_labels(datamodule):
                log.info("evaluation: no FID in the %s space: %s has no scene labels", name, type(datamodule).__name__)
                continue
            extractors[name] = image_features(feature_spaces(recipe)[name], datamodule)
            encoder = extractors[name].encoder
            spaces[name] = {"features": type(encoder).__name__, "dim": extractors[name].num_features}
            if getattr(encoder, "held_out_accuracy", None) is not None:
                spaces[name]["held_out_accuracy"] = encoder.held_out_accuracy
        frechet = {}
        if fid:
            real, _ = first_items(datamodule.val_dataloader(), evaluation.prompts)
            frechet = {name: FrechetDistance(features, real) for name, features in extractors.items()}
    sampler = None
    if diversity_prompts:
        prompts = datamodule.prompts("val", diversity_prompts)
        sampler = SampleDiversity(prompts, int(diversity.get("samples", 4)), extractors[headline], seed=evaluation.seed + 1)
    log.info("evaluation: FID%s in %s features%s", "" if fid else " (off), diversity", headline,
             "".join(f", also fid_{name}" for name in frechet if name != headline))
    return SampleStatistics(frechet, sampler, headline, spaces, evaluation.steps, evaluation.guidance)
