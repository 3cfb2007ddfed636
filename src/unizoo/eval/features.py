"""One feature vector per image, from a frozen network: what FID and diversity are measured in.

FID is defined on Inception features, which would have to be downloaded; the study runs
offline, on data Inception never saw. So the distance is measured in networks unizoo has:
a classifier of the shapes data's scene labels (`unizoo.eval.shapes_classifier`, the default
where the data has them: its features belong to neither representation), the tiny CLIP's
image tower it pretrains on the recipe's data, or a user's local CLIP/SigLIP. Each space is a
recipe node under ``evaluation.feature_spaces`` with ``encode(images) -> (B, N, D)``; this
module wraps one as the ``feature`` network torchmetrics' `FrechetInceptionDistance` accepts.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

log = logging.getLogger(__name__)


class ImageFeatures(nn.Module):
    """`images (B, 3, H, W) in [-1, 1] -> (B, D)`: the network's features, averaged over its tokens.

    ``num_features`` is read by torchmetrics, so it never runs a dummy image to find D.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        tokens, self.num_features = encoder.token_shape

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode(images).float().mean(dim=1)

    def train(self, mode: bool = True) -> ImageFeatures:
        # Frozen: a metric's .train() must not switch the tower's dropout / norm layers.
        super().train(mode)
        self.encoder.eval()
        return self


def image_features(config: DictConfig, datamodule: L.LightningDataModule) -> ImageFeatures:
    """A feature space of ``evaluation.feature_spaces`` built and made real (its cached network loaded, or trained)."""
    encoder = instantiate(config, _convert_="all")
    if getattr(encoder, "decoder", None) is not None:
        raise ValueError("an evaluation feature space must encode only: set its decoder to null")
    encoder.prepare(datamodule)
    log.info("evaluation features: %s, %d per image", type(encoder).__name__, encoder.token_shape[1])
    return ImageFeatures(encoder)
