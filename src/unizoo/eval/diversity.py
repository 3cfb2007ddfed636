"""Sample diversity: how different the images of one prompt are under different noise.

BLIP3-o reports that MSE targets collapse diversity: a regression to the mean target
draws the same image whatever the noise. The score is the mean pairwise distance between
the features of ``samples`` images of one prompt, averaged over ``prompts`` prompts.
Features are L2-normalised first, so the score does not depend on the tower's scale:
0 = identical images, 2 = opposite features.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """Mean Euclidean distance over the distinct pairs of rows of ``features (S, D)``, after L2 normalisation."""
    if len(features) < 2:
        raise ValueError(f"diversity needs at least 2 samples per prompt, got {len(features)}")
    unit = F.normalize(features.double(), dim=-1)
    distances = torch.cdist(unit, unit)
    n = len(unit)
    return float(distances.sum() / (n * (n - 1)))


@dataclass
class SampleDiversity:
    """``diversity(generate) -> float``: ``samples`` draws of each prompt, scored by mean pairwise feature distance.

    ``generate(prompts, seed) -> images`` draws one image per listed prompt with fresh
    noise per row (``UnifiedModel.generate``).
    """

    prompts: Sequence[str]
    samples: int
    features: Callable[[torch.Tensor], torch.Tensor]
    seed: int = 1

    def __call__(self, generate: Callable[[list[str], int], torch.Tensor]) -> float:
        repeated = [prompt for prompt in self.prompts for _ in range(self.samples)]
        features = self.features(generate(repeated, self.seed)).view(len(self.prompts), self.samples, -1)
        return sum(mean_pairwise_distance(group) for group in features) / len(self.prompts)
