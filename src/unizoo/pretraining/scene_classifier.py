"""A small image classifier of scene contents: what it counts where, as Inception is to ImageNet.

FID needs features that belong to neither side of a comparison. Measured in the tiny CLIP's
features, it favours CLIP targets, which are trained to produce exactly those features. This
network is trained on the ground truth the data itself knows (the shapes data's scene labels):
for every (shape, colour) pair, how many such objects an image holds (0-3), and in which cells
of a coarse grid each one sits. Its penultimate layer, one vector per image, is the feature
space FID and diversity are measured in (`unizoo.eval.shapes_classifier`).

    images (B, 3, S, S) -> conv stack -> (B, width, S/8, S/8) -> flatten -> features (B, D) -> counts, cells
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from unizoo.pretraining.batches import endless
from unizoo.runtime.fabric import describe, loop_fabric, optimise
from unizoo.runtime.progress import LoopProgress
from unizoo.runtime.schedules import warmup_cosine

log = logging.getLogger(__name__)

MAX_COUNT = 3  # objects of one (shape, colour) in an image: 0..3


class SceneClassifier(nn.Module):
    """`features(images) -> (B, feature_dim)`; `forward(images) -> (count logits (B, P, 4), cell logits (B, P, G))`.

    P = number of (shape, colour) pairs, G = grid cells. The spatial map is flattened, not
    pooled, before the feature layer, so the features keep where things are.
    """

    def __init__(self, pairs: int, cells: int, image_size: int = 32, width: int = 64, feature_dim: int = 64) -> None:
        super().__init__()
        if image_size % 8:
            raise ValueError(f"the scene classifier needs an image size divisible by 8, got {image_size}")
        self.pairs, self.cells, self.feature_dim = pairs, cells, feature_dim
        # Downsampling from the first layer: a few thousand images a second on two CPU cores, and
        # objects of 8-13 px at 32 px still span a cell of the first map.
        # Batch norm: without it the network sits for hundreds of steps on "no object anywhere" (most
        # of the 18 pairs are absent from any image) before it starts to count.
        self.trunk = nn.Sequential(
            nn.Conv2d(3, width // 2, 3, stride=2, padding=1), nn.BatchNorm2d(width // 2), nn.ReLU(),
            nn.Conv2d(width // 2, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        )
        side = image_size // 8
        self.to_features = nn.Sequential(nn.Flatten(), nn.Linear(width * side * side, feature_dim), nn.ReLU())
        self.counts = nn.Linear(feature_dim, pairs * (MAX_COUNT + 1))
        self.cells_head = nn.Linear(feature_dim, pairs * cells)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the penultimate layer `(B, feature_dim)`."""
        return self.to_features(self.trunk(images))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(images)
        return self.counts(features).view(-1, self.pairs, MAX_COUNT + 1), self.cells_head(features).view(-1, self.pairs, self.cells)


def scene_loss(model: SceneClassifier, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the counts plus binary cross-entropy of the occupied cells."""
    counts, cells = model(batch["image"])
    return F.cross_entropy(counts.flatten(0, 1), batch["counts"].flatten()) + F.binary_cross_entropy_with_logits(
        cells, batch["cells"].float()
    )


def train_scene_classifier(
    model: SceneClassifier,
    loader: Iterable[dict[str, torch.Tensor]],
    steps: int,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    precision: Literal["32-true", "bf16-mixed", "auto"] = "32-true",
) -> dict[str, Any]:
    """Train `model` in place on batches `{"image", "counts" (B, P), "cells" (B, P, G)}`, on the run's device."""
    torch.manual_seed(seed)
    fabric = loop_fabric(precision)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model, optimizer = fabric.setup(model, optimizer)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(min(50, steps // 2 + 1), steps, 0.02))
    batches = endless(loader)
    started = time.perf_counter()
    progress = LoopProgress(f"training the scene classifier ({describe(fabric)})", steps)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        batch = fabric.to_device(next(batches))
        with fabric.autocast():
            loss = scene_loss(model, batch)
        optimise(fabric, optimizer, loss, schedule)
        progress.step(lambda: {"loss": loss.item()})
    final = loss.item()
    progress.close({"loss": final})
    model.module.to("cpu").eval()
    seconds = time.perf_counter() - started
    log.info("scene classifier trained for %d steps (%s) in %.0f s (loss %.4f)", steps, describe(fabric), seconds, final)
    return {"loss": final, "seconds": seconds}


@torch.no_grad()
def scene_accuracy(model: SceneClassifier, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Held-out accuracy: `counts` (every pair's count right), `cells` (every occupied cell right), `scene` (both)."""
    model.eval()
    right = {"counts": 0, "cells": 0, "scene": 0}
    total = 0
    for batch in batches:
        counts, cells = model(batch["image"])
        counts_ok = (counts.argmax(-1) == batch["counts"]).all(dim=1)
        cells_ok = ((cells > 0) == batch["cells"].bool()).flatten(1).all(dim=1)
        right["counts"] += int(counts_ok.sum())
        right["cells"] += int(cells_ok.sum())
        right["scene"] += int((counts_ok & cells_ok).sum())
        total += len(counts_ok)
    return {key: value / max(1, total) for key, value in right.items()} | {"images": total}
