"""VAE latents as the generation target: a diffusers `AutoencoderKL`, frozen, patchified into tokens.

`encode(images (B, 3, H, W) in [-1, 1]) -> tokens (B, N, C)` with N = (H/f/p)², C = c·p²
for latent channels c, downsampling f and patch p; `decode` inverts it to pixels.
Weights come from a local diffusers directory (`pretrained`), or, on the embedded
default, from a VAE unizoo pretrains on the recipe's data and caches by content hash.

Frozen everywhere except in a stage that names its parameter group, "representation"
(REPA-E, `components/strategies/repa_e.py`): there `encode_differentiable` keeps the graph
to the VAE's weights and `reconstruction_loss` is the VAE's own loss. Latents are brought to
unit scale by one fitted shift and scale (`latent_norm: scalar`, diffusers' scaling factor),
or, as REPA-E does for a VAE whose latents move while the generator trains, by a batch norm
without affine parameters (`latent_norm: batch`): training batches normalise by their own
statistics and update the running ones, which everything else (sampling, decoding, the
gradient path into the VAE) uses.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from pathlib import Path
from typing import Annotated, Any, Literal

import lightning as L
import torch
from diffusers import AutoencoderKL
from torch import nn
from torch.nn import functional as F

from unizoo.config.recipe_types import ArgumentsOf
from unizoo.config.weights import local_weights
from unizoo.data.signature import data_signature
from unizoo.pretraining.autoencoder import fit_latent_normalisation, train_autoencoder
from unizoo.pretraining.cache import cached_directory

log = logging.getLogger(__name__)

LATENT_NORMS = ("scalar", "batch")
# Batches of real images the batch norm's running statistics start from (REPA-E initialises them from the latents' statistics).
_STATISTICS_BATCHES = 8

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
        latent_norm: Literal["scalar", "batch"] = "scalar",
    ) -> None:
        super().__init__()
        if latent_norm not in LATENT_NORMS:
            raise ValueError(f"representation.latent_norm={latent_norm!r}; valid choices: {', '.join(LATENT_NORMS)}")
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
        # REPA-E's normalisation (its BatchNorm2d: no affine part, eps 1e-4, momentum 0.1); None = the scalar one above.
        self.batch_norm = (
            nn.BatchNorm2d(self.latent_channels, eps=1e-4, momentum=0.1, affine=False) if latent_norm == "batch" else None
        )

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
        # The VAE's own layers stay in eval mode, trained or not (GroupNorm, no dropout: the same
        # function either way); the latents' batch norm follows the mode.
        super().train(mode)
        self.vae.eval()
        return self

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The VAE's weights, which a stage may train (REPA-E); frozen in every other stage."""
        return {"representation": list(self.vae.parameters())}

    def cache_signature(self, datamodule: L.LightningDataModule) -> dict[str, Any]:
        """Everything that decides the pretrained weights: the cache key hashes this."""
        return {
            # Private keys ("_use_default_values", ...) are bookkeeping, some in set order.
            "autoencoder": {k: v for k, v in self.vae.config.items() if not k.startswith("_")},
            "pretraining": self.pretraining,
            "data": data_signature(datamodule),
        }

    def prepare(self, datamodule: L.LightningDataModule) -> None:
        """Make the weights real: a `pretrained` VAE is ready; otherwise load or train the cached one.

        With `latent_norm: batch`, the batch norm's running statistics then start from the latents' own.
        """
        if self.pretrained is None:
            self._load_cached(datamodule)
        else:  # the log says where the weights came from in every case (cached, pretrained now, or given)
            log.info("representation: using the VAE at %s (representation.pretrained)", self.pretrained)
        if self.batch_norm is not None:
            self._fit_batch_norm(datamodule)

    def _load_cached(self, datamodule: L.LightningDataModule) -> None:
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
    def _fit_batch_norm(self, datamodule: L.LightningDataModule) -> None:
        datamodule.setup("fit")
        batches = itertools.islice(datamodule.train_dataloader(), _STATISTICS_BATCHES)
        latents = torch.cat([self.vae.encode(batch["image"].to(self.vae.dtype)).latent_dist.mean for batch in batches]).float()
        self.batch_norm.reset_running_stats()
        self.batch_norm.running_mean.copy_(latents.mean(dim=(0, 2, 3)))
        self.batch_norm.running_var.copy_(latents.var(dim=(0, 2, 3)))
        log.info("representation: latent batch norm starts from per-channel means %s, variances %s",
                 [round(v, 4) for v in self.batch_norm.running_mean.tolist()], [round(v, 4) for v in self.batch_norm.running_var.tolist()])

    def _normalise(self, latents: torch.Tensor, running: bool = False) -> torch.Tensor:
        """Latents `(B, c, h, w)` at unit scale; `running`: by the batch norm's running statistics even in training mode."""
        if self.batch_norm is None:
            return (latents - self.latent_shift) * self.latent_scale
        norm = self.batch_norm
        if running:
            return F.batch_norm(latents, norm.running_mean, norm.running_var, training=False, eps=norm.eps)
        return norm(latents)

    def _denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        if self.batch_norm is None:
            return latents / self.latent_scale + self.latent_shift
        norm = self.batch_norm
        return latents * (norm.running_var + norm.eps).sqrt().view(1, -1, 1, 1) + norm.running_mean.view(1, -1, 1, 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images `(B, 3, H, W)` in [-1, 1] -> tokens `(B, N, C)` (posterior means, normalised).

        With `latent_norm: batch` in training mode, normalised by the batch's statistics (which
        the running ones follow), as REPA-E normalises the generator's training targets.
        """
        # The posterior mean, not a sample: with the tiny KL weight the posterior is
        # nearly a point, and a deterministic target makes ablations repeatable.
        latents = self.vae.encode(images.to(self.vae.dtype)).latent_dist.mean
        return patchify(self._normalise(latents), self.patch_size)

    def encode_differentiable(self, images: torch.Tensor) -> torch.Tensor:
        """`encode`'s tokens `(B, N, C)` with their graph to the VAE's weights, normalised by fixed
        (running) statistics: REPA-E's alignment gradient reaches the VAE this way, and cannot move
        or exploit the normalisation."""
        latents = self.vae.encode(images.to(self.vae.dtype)).latent_dist.mean
        return patchify(self._normalise(latents, running=True), self.patch_size)

    def reconstruction_loss(self, images: torch.Tensor) -> torch.Tensor:
        """The VAE's own loss on images `(B, 3, H, W)`, as it was pretrained: L1 + MSE of the reconstruction
        of a posterior sample, + `kl_weight` x KL. In fp32 when its pretraining was (`precision: 32-true`,
        the default: bf16 spoils the tiny VAE's round trip)."""
        fp32 = self.pretraining.get("precision", "32-true") == "32-true"
        with torch.autocast(images.device.type, enabled=False) if fp32 else contextlib.nullcontext():
            images = images.to(self.vae.dtype)
            posterior = self.vae.encode(images).latent_dist
            reconstruction = self.vae.decode(posterior.sample()).sample.float()
            kl = posterior.kl().float().mean()
        images = images.float()
        return F.l1_loss(reconstruction, images) + F.mse_loss(reconstruction, images) + self.pretraining["kl_weight"] * kl

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens `(B, N, C)` -> images `(B, 3, H, W)` in [-1, 1]."""
        latents = self._denormalise(unpatchify(tokens, self.latent_channels, self.patch_size))
        return self.vae.decode(latents.to(self.vae.dtype)).sample.clamp(-1, 1)
