"""Self-supervised patch features as the generation target (the Web-SSL and RAE line of work), frozen.

`encode(images (B, 3, H, W) in [-1, 1]) -> tokens (B, N, C)`: the patch features of a
tiny ViT that unizoo pretrains on the recipe's images alone, without their captions, as
a masked autoencoder (`unizoo.pretraining.mae`, which says why MAE rather than DINO),
and caches by content hash as it does the VAE and the tiny CLIP. N = (H / patch)², C =
the encoder's width: at 32 px the tiny CLIP's shape (64 tokens of 64 channels), so the
two differ only in how the features were learned (pixels vs captions). Features are
normalised to unit scale as CLIP's are, and become pixels through the same trained
pixel decoder. Encode-only (`decoder: null`) it is also an image reader for the
understanding path (`backbone/vision_encoder=ssl`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, Literal

import lightning as L
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from unizoo.components.representations.feature_normalisation import check_normalisation, fit_normalisation, rounded
from unizoo.components.representations.pixel_decoder import PixelDecoder
from unizoo.config.recipe_types import ArgumentsOf
from unizoo.data.signature import data_signature
from unizoo.pretraining.cache import cached_directory
from unizoo.pretraining.mae import TINY_MAE, MAEArchitecture, TinyMAE, train_mae

log = logging.getLogger(__name__)

WEIGHTS_FILE = "mae.safetensors"


class SSLRepresentation(nn.Module):
    """The frozen encoder of a tiny MAE pretrained on the data: patch features, normalised to unit scale."""

    def __init__(
        self,
        image_size: int = 32,
        architecture: MAEArchitecture | None = None,
        pretraining: Annotated[dict[str, Any] | None, ArgumentsOf(train_mae)] = None,
        normalize: Literal["channel", "scalar", "none"] = "channel",
        decoder: Annotated[dict[str, Any] | None, ArgumentsOf(PixelDecoder)] = None,
    ) -> None:
        """`architecture`: the MAE's sizes (`TINY_MAE` keys); `pretraining`: `train_mae` settings;
        `normalize`: channel | scalar | none, as CLIP's; `decoder`: the pixel decoder's recipe, None = encode only."""
        super().__init__()
        self.image_size, self.normalize = image_size, check_normalisation(normalize)
        self.architecture: MAEArchitecture = {**TINY_MAE, **(architecture or {})}
        # Every setting spelled out, so the recipe and the Python default share one cache key.
        self.pretraining = {
            "steps": 1500, "lr": 1.5e-3, "weight_decay": 0.05, "warmup_steps": 50, "mask_ratio": 0.75,
            "norm_pix_loss": False, "precision": "32-true", **(pretraining or {}),
        }
        # Random until `prepare` loads (or pretrains) the cached MAE; shapes are already final.
        self.encoder = TinyMAE(image_size, self.architecture).encoder
        self.encoder.requires_grad_(False).eval()
        statistics_shape = (self.width,) if normalize == "channel" else ()
        self.register_buffer("feature_shift", torch.zeros(statistics_shape))
        self.register_buffer("feature_scale", torch.ones(statistics_shape))
        self.decoder = PixelDecoder(self.token_shape, **decoder, image_size=image_size) if decoder is not None else None

    @property
    def width(self) -> int:
        return self.encoder.hidden_size

    @property
    def token_shape(self) -> tuple[int, int]:
        """(N, C) of `encode`'s output."""
        return self.encoder.num_patches, self.width

    def train(self, mode: bool = True) -> "SSLRepresentation":
        # Frozen: Lightning's .train() must not switch the encoder's layers.
        super().train(mode)
        self.encoder.eval()
        return self

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """None: the encoder is frozen in every stage (no stage can name it)."""
        return {}

    def cache_signature(self, datamodule: L.LightningDataModule) -> dict[str, Any]:
        """Everything that decides the pretrained MAE: the cache key hashes this (captions play no part)."""
        return {
            "mae": dict(self.architecture),
            "image_size": self.image_size,
            "pretraining": self.pretraining,
            "data": data_signature(datamodule),
        }

    def prepare(self, datamodule: L.LightningDataModule) -> None:
        """Load (or pretrain and cache) the MAE, fit the normalisation, then the pixel decoder if there is one."""
        datamodule.setup("fit")
        signature = self.cache_signature(datamodule)

        def build(directory: Path) -> None:
            with torch.enable_grad():
                model = TinyMAE(self.image_size, self.architecture)  # initialised under the cache's fixed seed
                train_mae(model, datamodule.train_dataloader(), **self.pretraining, seed=0)
            save_file(model.state_dict(), str(directory / WEIGHTS_FILE))

        entry, reused = cached_directory("ssl_mae", signature, build)
        log.info("representation: %s the tiny MAE at %s", "reusing" if reused else "pretrained and cached", entry)
        weights = load_file(str(entry / WEIGHTS_FILE))
        prefix = "encoder."
        self.encoder.load_state_dict({key[len(prefix):]: value for key, value in weights.items() if key.startswith(prefix)})
        if self.normalize != "none":
            fit_normalisation(self, datamodule.train_dataloader())
            log.info("representation: SSL features normalised per %s (mean shift %.4f, mean scale %.4f)",
                     self.normalize, self.feature_shift.mean(), self.feature_scale.mean())
        if self.decoder is not None:
            # The decoder depends on exactly these features: the encoder's weights and the fitted normalisation.
            features = {
                "ssl": signature,
                "normalisation": {"kind": self.normalize, "shift": rounded(self.feature_shift), "scale": rounded(self.feature_scale)},
            }
            self.decoder.prepare(datamodule, self, features)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images `(B, 3, H, W)` in [-1, 1] -> tokens `(B, N, C)` (normalised patch features of the whole image)."""
        dtype = self.encoder.patch_embed.weight.dtype
        tokens = self.encoder(images.to(dtype))
        return (tokens - self.feature_shift) * self.feature_scale

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens `(B, N, C)` -> images `(B, 3, H, W)` in [-1, 1], through the trained pixel decoder."""
        if self.decoder is None:
            raise RuntimeError(
                "SSL features are not pixels: decoding generated tokens needs the pixel decoder. Set "
                "representation.decoder=${decoder} (recipes/decoder/), which unizoo trains and caches in prepare()"
            )
        return self.decoder.decode(tokens)
