"""One feature vector per image, from a frozen CLIP image tower: what FID and diversity are measured in.

FID is defined on Inception features, which would have to be downloaded; the study runs
offline, on data Inception never saw. So the distance is measured in the image tower
unizoo already has: the tiny CLIP it pretrains (and caches) on the recipe's data, or a
user's local CLIP/SigLIP through ``evaluation.features.pretrained``. The recipe value
``evaluation.features`` is a `CLIPRepresentation` (encode only); this module wraps it as
the ``feature`` network torchmetrics' `FrechetInceptionDistance` accepts.
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
    """`images (B, 3, H, W) in [-1, 1] -> (B, D)`: the tower's patch features, averaged over the image.

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
    """The recipe's ``evaluation.features`` built and made real (the cached tiny CLIP is loaded or pretrained)."""
    encoder = instantiate(config, _convert_="all")
    if getattr(encoder, "decoder", None) is not None:
        raise ValueError("evaluation.features must encode only: set evaluation.features.decoder=null")
    encoder.prepare(datamodule)
    log.info("evaluation features: %s, %d per image", type(encoder).__name__, encoder.token_shape[1])
    return ImageFeatures(encoder)
