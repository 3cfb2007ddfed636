"""Frechet distance between generated and real images, in a feature space of unizoo's own (torchmetrics' FID).

torchmetrics' `FrechetInceptionDistance` takes any ``nn.Module`` as its ``feature``
network; fed `ImageFeatures` (the tiny CLIP tower), it never downloads Inception. The
real images' statistics are accumulated once and kept (``reset_real_features=False``),
so each call only embeds the generated batch.

The value is not comparable with published FIDs (other features, 32 px, a few hundred
images); it ranks variants measured with the same features and the same real images.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

# Embedding batch: bounded memory for a big tower; the statistics do not depend on it.
BATCH = 64


class FrechetDistance:
    """``fd(images) -> float``: the Frechet distance of ``images`` to the real images given once."""

    def __init__(self, features: nn.Module, real: torch.Tensor) -> None:
        if len(real) < 2:
            raise ValueError(f"the Frechet distance needs at least 2 real images, got {len(real)}")
        # normalize=True: the network receives float images untouched (unizoo's [-1, 1]).
        self.metric = FrechetInceptionDistance(feature=features, normalize=True, reset_real_features=False)
        for start in range(0, len(real), BATCH):
            self.metric.update(real[start : start + BATCH].float(), real=True)

    def __call__(self, images: torch.Tensor) -> float:
        if len(images) < 2:
            raise ValueError(f"the Frechet distance needs at least 2 generated images, got {len(images)}")
        self.metric.reset()  # the generated side only: the real statistics stay
        for start in range(0, len(images), BATCH):
            self.metric.update(images[start : start + BATCH].float(), real=False)
        return float(self.metric.compute())
