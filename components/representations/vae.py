"""VAE latents as the generation target: a diffusers `AutoencoderKL`, frozen, patchified into tokens.

`encode(images (B, 3, H, W) in [-1, 1]) -> tokens (B, N, C)` with N = (H/f/p)², C = c·p²
for latent channels c, downsampling f and patch p; `decode` inverts it to pixels.
Weights come from a local diffusers directory (`pretrained`), or, on the embedded
default, from a VAE unizoo pretrains on the recipe's data and caches by content hash.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import lightning as L
import torch
from diffusers import AutoencoderKL
from torch import nn

from unizoo.config.recipe_types import ArgumentsOf
from unizoo.config.weights import local_weights
from unizoo.data.signature import data_signature
from unizoo.pretraining.autoencoder import fit_latent_normalisation, train_autoencoder
from unizoo.pretraining.cache import cached_directory

log = logging.getLogger(__name__)

# The embedded default: 32 px -> 8x8x4 latents (downsampling 4), about 1M parameters.
TINY_AUTOENCODER: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[32, 64, 64],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
)


def patchify(latents: torch.Tensor, patch: int) -> torch.Tensor:
    """`(B, c, h, w) -> (B, (h/p)(w/p), c p p)`, row-major over patches."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(tokens: torch.Tensor, channels: int, patch: int) -> torch.Tensor:
    """Inverse of `patchify` for a square grid."""
    b, n, _ = tokens.shape
    side = int(round(n**0.5))
    x = tokens.reshape(b, side, side, channels, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, channels, side * patch, side * patch)


class VAERepresentation(nn.Module):
    """Frozen `AutoencoderKL` latents, normalised and patchified."""

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 1,
        autoencoder: Annotated[dict[str, Any] | None, ArgumentsOf(AutoencoderKL)] = None,
        pretrained: str | None = None,
        pretraining: Annotated[dict[str, Any] | None, ArgumentsOf(train_autoencoder)] = None,
    ) -> None:
        super().__init__()
        if pretrained is not None:
            path = local_weights(
                pretrained,
                "representation.pretrained",
                "a local diffusers AutoencoderKL directory (config.json + weights, e.g. written by "
                "`vae.save_pretrained(DIR)` or the `vae/` folder of a Stable Diffusion checkpoint)",
                "set representation.pretrained=null to let unizoo pretrain a tiny VAE on the recipe's data",
                directory=True,
            )
            self.vae = AutoencoderKL.from_pretrained(path, low_cpu_mem_usage=False)
        else:
            self.vae = AutoencoderKL(**{**TINY_AUTOENCODER, **(autoencoder or {}), "sample_size": image_size})
        self.vae.requires_grad_(False).eval()
        self.image_size, self.patch_size = image_size, patch_size
        self.pretrained = pretrained
        self.pretraining = {"steps": 1000, "lr": 2e-3, "kl_weight": 1e-6, **(pretraining or {})}
        # Buffers, so a run's checkpoint carries the normalisation with the weights.
        config = self.vae.config
        self.register_buffer("latent_shift", torch.tensor(float(config.shift_factor or 0.0)))
        self.register_buffer("latent_scale", torch.tensor(float(config.scaling_factor)))

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def token_shape(self) -> tuple[int, int]:
        """(N, C) of `encode`'s output."""
        downsampling = 2 ** (len(self.vae.config.block_out_channels) - 1)
        side = self.image_size // downsampling // self.patch_size
        return side * side, self.latent_channels * self.patch_size**2

    def train(self, mode: bool = True) -> "VAERepresentation":
        # Frozen: Lightning's .train() must not switch the VAE's norm layers.
        super().train(mode)
        self.vae.eval()
        return self

    def cache_signature(self, datamodule: L.LightningDataModule) -> dict[str, Any]:
        """Everything that decides the pretrained weights: the cache key hashes this."""
        return {
            # Private keys ("_use_default_values", ...) are bookkeeping, some in set order.
            "autoencoder": {k: v for k, v in self.vae.config.items() if not k.startswith("_")},
            "pretraining": self.pretraining,
            "data": data_signature(datamodule),
        }

    def prepare(self, datamodule: L.LightningDataModule) -> None:
        """Make the weights real: a `pretrained` VAE is ready; otherwise load or train the cached one."""
        if self.pretrained is not None:
            return
        signature = self.cache_signature(datamodule)
        datamodule.setup("fit")

        def build(directory: Path) -> None:
            # A fresh model: its initialisation is drawn under the cache's fixed seed, not
            # wherever self.vae happened to be built in a recipe.
            vae = AutoencoderKL.from_config(self.vae.config)
            with torch.enable_grad():
                train_autoencoder(vae, datamodule.train_dataloader(), **self.pretraining, seed=0)
            shift, scale = fit_latent_normalisation(vae, datamodule.train_dataloader())
            vae.register_to_config(shift_factor=shift, scaling_factor=scale)
            vae.save_pretrained(directory)

        entry, reused = cached_directory("autoencoder", signature, build)
        if reused:
            log.info("representation: reusing the cached VAE at %s", entry)
        else:
            log.info("representation: pretrained a VAE and cached it at %s", entry)
        trained = AutoencoderKL.from_pretrained(entry, low_cpu_mem_usage=False)
        self.vae.load_state_dict(trained.state_dict())
        self.latent_shift.fill_(trained.config.shift_factor)
        self.latent_scale.fill_(trained.config.scaling_factor)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images `(B, 3, H, W)` in [-1, 1] -> tokens `(B, N, C)` (posterior means, normalised)."""
        # The posterior mean, not a sample: with the tiny KL weight the posterior is
        # nearly a point, and a deterministic target makes ablations repeatable.
        latents = self.vae.encode(images.to(self.vae.dtype)).latent_dist.mean
        return patchify((latents - self.latent_shift) * self.latent_scale, self.patch_size)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens `(B, N, C)` -> images `(B, 3, H, W)` in [-1, 1]."""
        latents = unpatchify(tokens, self.latent_channels, self.patch_size) / self.latent_scale + self.latent_shift
        return self.vae.decode(latents.to(self.vae.dtype)).sample.clamp(-1, 1)
