"""Evaluations run before and after each stage: generation (samples scored) and understanding (captions scored)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from unizoo.eval.chance import format_scores
from unizoo.images import save_grid
from unizoo.model import UnifiedModel

log = logging.getLogger(__name__)


@dataclass
class SampleEvaluation:
    """Fixed prompts and sampler settings, so every evaluation of a run is comparable."""

    prompts: Sequence[str]
    evaluator: Callable[[list[str], torch.Tensor], dict[str, float]]
    steps: int | None = None  # None: the objective's default
    guidance: float | None = None
    seed: int = 0
    chance: dict[str, float] | None = None  # the evaluator's chance levels, logged beside each score
    grid_size: int = 64  # prompts shown in the sample grid (all are scored)

    def __call__(self, model: UnifiedModel, grid_path: Path | None) -> dict[str, float]:
        return self.score(self.draw(model), grid_path)

    def draw(self, model: UnifiedModel) -> torch.Tensor:
        start = time.perf_counter()
        images = model.generate(list(self.prompts), steps=self.steps, guidance=self.guidance, seed=self.seed)
        log.info("sampled %d prompts (%.0f s)", len(self.prompts), time.perf_counter() - start)
        return images

    def score(self, images: torch.Tensor, grid_path: Path | None) -> dict[str, float]:
        """The evaluator's scores of images drawn by `draw`; their grid to ``grid_path`` unless None."""
        start = time.perf_counter()
        if grid_path is not None:
            save_grid(images[: self.grid_size], grid_path, captions=self.prompts[: self.grid_size])
        scores = self.evaluator(list(self.prompts), images)
        log.info(
            "evaluation on %d prompts (scored in %.0f s): %s%s",
            len(self.prompts),
            time.perf_counter() - start,
            format_scores(scores, self.chance),
            f" -> {grid_path}" if grid_path is not None else "",
        )
        return scores


def first_items(loader, n: int) -> tuple[torch.Tensor, list[str]]:
    """The first `n` images and captions a (non-shuffling) loader yields."""
    images, captions = [], []
    for batch in loader:
        images.append(batch["image"])
        captions.extend(batch["caption"])
        if len(captions) >= n:
            break
    return torch.cat(images)[:n], captions[:n]


@dataclass
class CaptionEvaluation:
    """Caption fixed held-out images with the backbone and score them against the true captions."""

    images: torch.Tensor
    truth: Sequence[str]
    scorer: Callable[[list[str], list[str]], dict[str, float]]

    def __call__(self, model: UnifiedModel, examples_path: Path | None) -> dict[str, float]:
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        captions = model.backbone.caption(self.images)
        model.train(was_training)
        scores = self.scorer(captions, list(self.truth))
        if examples_path is not None:
            examples_path.write_text("".join(f"{p}\t<- truth: {t}\n" for p, t in zip(captions, self.truth)))
        log.info(
            "understanding on %d images (%.0f s): %s%s",
            len(captions),
            time.perf_counter() - start,
            ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if isinstance(v, float)),
            f" -> {examples_path}" if examples_path is not None else "",
        )
        return scores


def random_like_statistics(tokens: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Gaussian tokens with the mean and std of `tokens (B, N, C)` at each (token, channel) position."""
    mean, std = tokens.float().mean(0), tokens.float().std(0)
    noise = torch.randn(tokens.shape, generator=rng).to(tokens.device)
    return (mean + std * noise).to(tokens.dtype)


@dataclass
class RoundTripEvaluation:
    """How much of what the evaluator sees survives the representation: score(decode(encode(x))) vs score(x)."""

    images: torch.Tensor
    captions: Sequence[str]
    evaluator: Callable[[list[str], torch.Tensor], dict[str, float]]
    score: str = "overall"  # the evaluator's score compared ("agreement" on data without an exact evaluator)

    def __call__(self, representation: torch.nn.Module, grid_path: Path) -> dict[str, float]:
        was_training = representation.training
        representation.eval()  # a representation's batch norm (REPA-E's latents) reads its running statistics, as sampling does
        try:
            return self._measure(representation, grid_path)
        finally:
            representation.train(was_training)

    def _measure(self, representation: torch.nn.Module, grid_path: Path) -> dict[str, float]:
        start = time.perf_counter()
        tokens = representation.encode(self.images)
        decoded = representation.decode(tokens).float().cpu()
        original = self.evaluator(list(self.captions), self.images)[self.score]
        round_trip = self.evaluator(list(self.captions), decoded)[self.score]
        # The floor: what decoding tokens that merely look like the real ones (same mean and std
        # per token and channel, no image behind them) scores against the same captions. A
        # decoder that draws clean shapes from anything lifts this above zero.
        random_tokens = random_like_statistics(tokens, torch.Generator().manual_seed(0))
        random_features = self.evaluator(list(self.captions), representation.decode(random_tokens).float().cpu())[self.score]
        shown = min(16, len(self.captions))  # originals above, their round trips below
        save_grid(torch.cat([self.images[:shown], decoded[:shown]]), grid_path, captions=[*self.captions[:shown]] * 2, columns=shown)
        scores = {
            "original": original,
            "round_trip": round_trip,
            "ratio": round_trip / original if original else 0.0,
            "random_features": random_features,
        }
        log.info(
            "representation round trip on %d images (%.0f s): evaluator %s %.3f -> %.3f (ratio %.3f); "
            "random tokens of the same statistics decode to %.3f -> %s",
            len(self.captions), time.perf_counter() - start, self.score, original, round_trip, scores["ratio"], random_features, grid_path,
        )
        return scores
