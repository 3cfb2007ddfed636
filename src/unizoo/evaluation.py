"""Generate for fixed prompts, save the grid, score with the recipe's evaluator."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from unizoo.images import save_grid
from unizoo.model import UnifiedModel

log = logging.getLogger(__name__)


@dataclass
class SampleEvaluation:
    """Fixed prompts and sampler settings, so every evaluation of a run is comparable."""

    prompts: Sequence[str]
    evaluator: Callable[[list[str], torch.Tensor], dict[str, float]]
    steps: int = 30
    guidance: float = 3.0
    seed: int = 0

    def __call__(self, model: UnifiedModel, grid_path: Path) -> dict[str, float]:
        start = time.perf_counter()
        images = model.generate(list(self.prompts), steps=self.steps, guidance=self.guidance, seed=self.seed)
        save_grid(images, grid_path, captions=self.prompts)
        scores = self.evaluator(list(self.prompts), images)
        log.info(
            "evaluation on %d prompts (%.0f s): %s -> %s",
            len(self.prompts),
            time.perf_counter() - start,
            ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if isinstance(v, float)),
            grid_path,
        )
        return scores
