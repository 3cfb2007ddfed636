"""The run's generation evaluator: ``evaluate(prompts, images) -> scores``, chosen by what the data allows.

Data with an exact evaluator (the shapes data: `has_exact_evaluator = True`, the default
for a data module that does not say) is scored by ``recipe.evaluator`` (GenEval-style
categories). Data without one (an image folder, WebDataset shards) cannot be parsed into
objects, so its samples are scored by the caption-image agreement (`unizoo.eval.agreement`);
FID against its validation images is turned on for it as well (`unizoo.eval.sample_statistics`).
``evaluation.agreement.enabled=true`` adds the agreement to an exact evaluator's scores.

The same evaluator scores real validation images against other images' captions (chance,
`unizoo.eval.chance`) and against their own (``metrics.json`` "real": the ceiling).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from unizoo.components.representations.clip import CLIPRepresentation
from unizoo.eval.agreement import CaptionImageAgreement

Evaluator = Callable[[list[str], torch.Tensor], dict[str, float]]


def has_exact_evaluator(datamodule) -> bool:
    """Whether ``recipe.evaluator`` can parse this data's images (data modules say so; unsaid: yes)."""
    return bool(getattr(datamodule, "has_exact_evaluator", True))


def headline_score(datamodule) -> str:
    """The one score that sums up a generation evaluation of this data."""
    return "overall" if has_exact_evaluator(datamodule) else "agreement"


def agreement_enabled(recipe: DictConfig, datamodule) -> bool:
    return not has_exact_evaluator(datamodule) or bool(OmegaConf.select(recipe, "evaluation.agreement.enabled", default=False))


def caption_image_agreement(recipe: DictConfig, datamodule) -> CaptionImageAgreement:
    """The agreement scorer with ``evaluation.agreement.pretrained`` or, when null, the recipe's tiny CLIP."""
    pretrained = OmegaConf.select(recipe, "evaluation.agreement.pretrained", default=None)
    if pretrained is not None:
        return CaptionImageAgreement(Path(pretrained))
    # The same tiny CLIP (and cache entry) as representation=clip and the FID features: both towers are kept.
    tiny = CLIPRepresentation(
        image_size=recipe.data.image_size,
        clip=OmegaConf.to_container(recipe.clip.architecture, resolve=True),
        pretraining=OmegaConf.to_container(recipe.clip.pretraining, resolve=True),
        normalize="none",
    )
    datamodule.setup("fit")
    return CaptionImageAgreement(tiny.tiny_clip_directory(datamodule))


def generation_evaluator(recipe: DictConfig, datamodule) -> Evaluator:
    """The exact evaluator, the agreement, or both merged into one dict of scores."""
    parts: list[Evaluator] = []
    if has_exact_evaluator(datamodule):
        parts.append(instantiate(recipe.evaluator))
    if agreement_enabled(recipe, datamodule):
        # Forked: building a CLIP draws initial weights, which must not move training's random stream.
        with torch.random.fork_rng(devices=[]):
            parts.append(caption_image_agreement(recipe, datamodule))
    if len(parts) == 1:
        return parts[0]

    def evaluate(prompts: list[str], images: torch.Tensor | Sequence[torch.Tensor]) -> dict[str, float]:
        return {key: value for part in parts for key, value in part(prompts, images).items()}

    return evaluate
