"""FID and diversity in the features of a classifier of the shapes data's ground truth, which neither representation owns.

The classifier (`unizoo.pretraining.scene_classifier`) learns, from the data's own scene
labels, how many objects of each shape and colour an image holds and in which cells of a
3x3 grid each sits. Trained once on the training split and cached like the tiny VAE (keyed by
its settings and the data recipe), its held-out accuracy is measured on val images and kept
with it, so every table can say how much its features can be trusted.

    evaluation.features: shapes_classifier     # FID and diversity in these features (the default for shapes data)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from unizoo.data.scene import COLOURS, SHAPES, Scene
from unizoo.data.signature import data_signature
from unizoo.errors import RecipeError
from unizoo.pretraining.cache import cached_directory
from unizoo.pretraining.scene_classifier import MAX_COUNT, SceneClassifier, scene_accuracy, train_scene_classifier

log = logging.getLogger(__name__)

GRID = 3  # cells per side of the position grid
PAIRS = [(shape, colour) for shape in SHAPES for colour in COLOURS]
PAIR_INDEX = {pair: index for index, pair in enumerate(PAIRS)}
WEIGHTS_FILE = "classifier.safetensors"
ACCURACY_FILE = "accuracy.json"
HELD_OUT = 1000  # val images the accuracy is measured on
STANDARDISE_ITEMS = 2048  # training images the features' per-dimension mean and std are fitted on


def scene_labels(scene: Scene) -> dict[str, torch.Tensor]:
    """`counts (P,)`: objects per (shape, colour) pair, capped at 3; `cells (P, GRID*GRID)`: the cells holding one."""
    counts = [0] * len(PAIRS)
    cells = [[False] * (GRID * GRID) for _ in PAIRS]
    for obj in scene.objects:
        pair = PAIR_INDEX[obj.shape, obj.colour]
        counts[pair] = min(MAX_COUNT, counts[pair] + 1)
        column, row = (min(GRID - 1, int(value * GRID)) for value in (obj.cx, obj.cy))
        cells[pair][row * GRID + column] = True
    return {"counts": torch.tensor(counts), "cells": torch.tensor(cells)}


class SceneLabels(Dataset):
    """The first `size` items of a shapes data set, each with its image and its scene's labels."""

    def __init__(self, dataset, size: int | None = None) -> None:
        self.dataset, self.size = dataset, len(dataset) if size is None else min(size, len(dataset))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        scene = self.dataset.scene(index)
        return {"image": self.dataset.image(scene), **scene_labels(scene)}


def has_scene_labels(datamodule) -> bool:
    """Whether the data knows what each image holds (the shapes data does; image folders and shards do not)."""
    try:
        return callable(getattr(datamodule.dataset("train"), "scene", None))
    except Exception:  # noqa: BLE001 - a data module without map-style splits has no labels either
        return False


def without_scene_labels(datamodule) -> str:
    """Why the classifier's features cannot be had for this data, and what to use instead."""
    return (f"evaluation.features=shapes_classifier learns from the shapes data's scene labels, which "
            f"{type(datamodule).__name__} has none of: use evaluation.features=clip (or auto) for this data")


class ShapesClassifierFeatures(nn.Module):
    """`encode(images (B, 3, H, W) in [-1, 1]) -> (B, 1, feature_dim)`: the scene classifier's penultimate features.

    `training`: steps, lr, batch_size, train_items (training-split items it learns from), precision.
    """

    def __init__(self, image_size: int = 32, width: int = 64, feature_dim: int = 32, training: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.image_size = image_size
        self.architecture = {"image_size": image_size, "width": width, "feature_dim": feature_dim, "grid": GRID, "pairs": len(PAIRS),
                             "standardised": True}
        self.classifier = SceneClassifier(len(PAIRS), GRID * GRID, image_size, width, feature_dim)
        self.classifier.requires_grad_(False).eval()
        # Features are standardised per dimension by their statistics on training images: a distance
        # in them is in units of real images' own variation, whatever scale the network learned.
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))
        self.training_settings = {"steps": 3000, "lr": 2e-3, "batch_size": 64, "train_items": 20000, "precision": "32-true",
                                  **(training or {})}
        self.held_out_accuracy: dict[str, float] | None = None

    @property
    def token_shape(self) -> tuple[int, int]:
        return 1, self.classifier.feature_dim

    def train(self, mode: bool = True) -> ShapesClassifierFeatures:
        super().train(mode)
        self.classifier.eval()  # frozen: a metric's .train() must not switch it
        return self

    def cache_signature(self, datamodule: L.LightningDataModule) -> dict[str, Any]:
        return {"classifier": self.architecture, "training": self.training_settings, "data": data_signature(datamodule)}

    def prepare(self, datamodule: L.LightningDataModule) -> None:
        """Load (or train and cache) the classifier of this data recipe, with its held-out accuracy."""
        if not has_scene_labels(datamodule):
            raise RecipeError(without_scene_labels(datamodule))
        settings = dict(self.training_settings)
        batch_size, train_items = settings.pop("batch_size"), settings.pop("train_items")

        def build(directory: Path) -> None:
            train = SceneLabels(datamodule.dataset("train"), train_items)
            loader = DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))
            with torch.enable_grad():
                self.classifier.requires_grad_(True)
                train_scene_classifier(self.classifier, loader, **settings)
                self.classifier.requires_grad_(False).eval()
            held_out = DataLoader(SceneLabels(datamodule.dataset("val"), HELD_OUT), batch_size=250)
            accuracy = scene_accuracy(self.classifier, held_out)
            with torch.no_grad():
                fitted = torch.cat([self.classifier.features(batch["image"]) for batch in
                                    DataLoader(SceneLabels(datamodule.dataset("train"), STANDARDISE_ITEMS), batch_size=256)])
            self.feature_mean.copy_(fitted.mean(0))
            self.feature_std.copy_(fitted.std(0).clamp_min(1e-6))
            save_file(self.state_dict(), str(directory / WEIGHTS_FILE))
            (directory / ACCURACY_FILE).write_text(json.dumps(accuracy, indent=2))

        datamodule.setup("fit")
        entry, reused = cached_directory("shapes_classifier", self.cache_signature(datamodule), build)
        self.load_state_dict(load_file(str(entry / WEIGHTS_FILE)))
        self.held_out_accuracy = json.loads((entry / ACCURACY_FILE).read_text())
        log.info("evaluation features: %s the shapes classifier at %s; held-out accuracy on %d val images: scene %.3f "
                 "(counts %.3f, positions %.3f)", "reusing" if reused else "trained and cached", entry,
                 self.held_out_accuracy["images"], self.held_out_accuracy["scene"], self.held_out_accuracy["counts"],
                 self.held_out_accuracy["cells"])

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.classifier.parameters()).device
        features = self.classifier.features(images.to(device).float())
        return ((features - self.feature_mean) / self.feature_std).unsqueeze(1)
