"""Caption-image agreement: how well generated images match their prompts, in a CLIP's shared embedding.

The score is torchmetrics' `CLIPScore`: 100 x the cosine similarity of each image's CLIP
image embedding to its prompt's CLIP text embedding, averaged over the pairs and then
floored at 0 (torchmetrics floors the mean, not each pair). `CLIPScore` accepts any
model/processor pair through a callable, so no hub download is involved: the CLIP is a
local directory, either the tiny CLIP unizoo pretrains (and caches) on the recipe's data
or a user's (`evaluation.agreement.pretrained`, read with `CLIPModel.from_pretrained`).

A number alone says little (the tiny CLIP's scale is its own), so a run also scores real
validation images against their own captions (the ceiling a perfect generator reaches)
and against other images' captions (chance): see `unizoo.eval.generation_evaluator`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchmetrics.multimodal.clip_score import CLIPScore
from transformers import AutoTokenizer, CLIPModel, PreTrainedTokenizerBase

from unizoo.pretraining.clip import CLIP_MEAN, CLIP_STD, preprocess

log = logging.getLogger(__name__)

# Images embedded per forward pass: bounded memory for a big CLIP; the score does not depend on it.
BATCH = 64


class _Embeddings(nn.Module):
    """The two `get_*_features` calls `CLIPScore` makes, returning the projected embeddings as tensors.

    transformers 5 returns model outputs from them (the embedding is their ``pooler_output``);
    torchmetrics expects the tensor.
    """

    def __init__(self, model: CLIPModel) -> None:
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.config = model.config  # CLIPScore reads the text length limit from it

    @staticmethod
    def _tensor(output: Any) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    @torch.no_grad()
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    @torch.no_grad()
    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


class _Processor:
    """What `CLIPScore` calls as its processor: unizoo images in [-1, 1] -> CLIP pixels, captions -> token ids."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_size: int, mean: Sequence[float], std: Sequence[float], max_length: int) -> None:
        self.tokenizer, self.image_size, self.mean, self.std, self.max_length = tokenizer, image_size, mean, std, max_length

    def __call__(self, text: list[str] | None = None, images: list[torch.Tensor] | None = None, **_: Any) -> dict[str, torch.Tensor]:
        if images is not None:
            return {"pixel_values": preprocess(torch.stack(images), self.image_size, self.mean, self.std)}
        # Truncated by the tokenizer, so a long caption keeps the end token the text tower pools at.
        return dict(self.tokenizer(text, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"))


def _pixel_statistics(directory: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    processor = directory / "preprocessor_config.json"
    if not processor.is_file():
        return CLIP_MEAN, CLIP_STD
    stats = json.loads(processor.read_text())
    return tuple(stats.get("image_mean", CLIP_MEAN)), tuple(stats.get("image_std", CLIP_STD))


class CaptionImageAgreement:
    """``agreement(prompts, images) -> {"agreement": CLIPScore}``, images ``(B, 3, H, W)`` (or a list of
    ``(3, H, W)``) in [-1, 1], the CLIP read from ``directory`` (weights, config, tokenizer)."""

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory).expanduser()
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(
                f"evaluation.agreement.pretrained={str(directory)!r} is not a transformers CLIP directory (no config.json): "
                "expected what `CLIPModel.save_pretrained(DIR)` and the tokenizer's `save_pretrained(DIR)` write; "
                "or set evaluation.agreement.pretrained=null for the tiny CLIP unizoo pretrains on the data"
            )
        model = CLIPModel.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        mean, std = _pixel_statistics(directory)
        processor = _Processor(
            tokenizer, model.config.vision_config.image_size, mean, std, model.config.text_config.max_position_embeddings
        )
        self.embeddings, self.processor = _Embeddings(model), processor
        self.metric = CLIPScore(model_name_or_path=lambda: (self.embeddings, self.processor))
        log.info("caption-image agreement: CLIPScore with the CLIP at %s", directory)

    @torch.no_grad()
    def per_pair(self, prompts: Sequence[str], images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """``(B,)``: 100 x the cosine of each image's embedding and its prompt's, unfloored (CLIPScore's per-pair
        score, whose mean it floors at 0): a verifier ranks images by it (``unizoo.eval.verifiers``)."""
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} images")
        scores = []
        for start in range(0, len(prompts), BATCH):
            batch = [image.float().cpu() for image in images[start : start + BATCH]]
            image_features = self.embeddings.get_image_features(**self.processor(images=batch))
            text_features = self.embeddings.get_text_features(**self.processor(text=list(prompts[start : start + BATCH])))
            image_features = image_features / image_features.norm(dim=-1, keepdim=True)
            text_features = text_features / text_features.norm(dim=-1, keepdim=True)
            scores.append(100 * (image_features * text_features).sum(-1))
        return torch.cat(scores).float()

    def __call__(self, prompts: Sequence[str], images: torch.Tensor | Sequence[torch.Tensor]) -> dict[str, float]:
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} images")
        self.metric.reset()
        for start in range(0, len(prompts), BATCH):
            batch = images[start : start + BATCH]
            self.metric.update([image.float().cpu() for image in batch], list(prompts[start : start + BATCH]))
        return {"agreement": float(self.metric.compute())}
