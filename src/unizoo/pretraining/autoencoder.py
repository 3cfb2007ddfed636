"""Pretrain a small diffusers `AutoencoderKL` on the recipe's images (reconstruction + KL).

The embedded default has no downloadable VAE, so unizoo trains one on the same data
the study uses; its decoder then "knows" the shapes, which is what makes clean
images come out of a small generator.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Literal

import torch
from diffusers import AutoencoderKL
from torch.nn import functional as F
from torch.utils.data import DataLoader

from unizoo.pretraining.batches import endless_images
from unizoo.runtime.fabric import describe, loop_fabric, loop_precision, optimise
from unizoo.runtime.progress import LoopProgress
from unizoo.runtime.schedules import warmup_cosine

log = logging.getLogger(__name__)


def train_autoencoder(
    vae: AutoencoderKL,
    loader: DataLoader,
    steps: int,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
    batch_size: int | None = None,
    precision: Literal["32-true", "bf16-mixed", "auto"] = "32-true",
    seed: int = 0,
) -> dict[str, float]:
    """Train `vae` in place for `steps` batches of `loader`, on the run's device; returns the final losses.

    `batch_size` splits each of the loader's batches into optimiser steps of that many
    images (None: one step per batch); `precision` "bf16-mixed" runs forward and backward
    under bf16 autocast, with fp32 weights and losses ("auto": the run's precision).
    The weights are back on the CPU when it returns.
    """
    torch.manual_seed(seed)
    fabric = loop_fabric(precision)
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae, optimizer = fabric.setup(vae, optimizer)
    # Cosine decay: the last steps at a small rate sharpen edges noticeably.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(min(50, steps // 2 + 1), steps, 0.02))
    batches = endless_images(loader, batch_size)
    start = time.perf_counter()
    progress = LoopProgress(f"pretraining VAE ({describe(fabric)})", steps)
    for _ in range(steps):
        images = fabric.to_device(next(batches))
        with fabric.autocast():
            posterior = vae.encode(images).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample.float()
            kl = posterior.kl().float().mean()
        recon = F.l1_loss(reconstruction, images) + F.mse_loss(reconstruction, images)
        loss = recon + kl_weight * kl
        optimise(fabric, optimizer, loss, schedule)
        progress.step(lambda: {"reconstruction": recon.item(), "kl": kl.item()})
    final = {"reconstruction": recon.item(), "kl": kl.item()}
    progress.close(final)
    vae = vae.module.to("cpu").eval()
    log.info("VAE pretrained for %d steps of %d images (%s) on %s in %.0f s (reconstruction loss %.4f)",
             steps, len(images), loop_precision(precision), fabric.device, time.perf_counter() - start, final["reconstruction"])
    return final


@torch.no_grad()
def fit_latent_normalisation(vae: AutoencoderKL, loader: DataLoader, batches: int = 8) -> tuple[float, float]:
    """(shift, scale) that map the posterior means of real images to zero mean, unit variance.

    Diffusers stores these as `shift_factor` / `scaling_factor`; SD's 0.18215 was
    measured the same way.
    """
    means = [vae.encode(batch["image"]).latent_dist.mean for batch in itertools.islice(loader, batches)]
    latents = torch.cat(means)
    return latents.mean().item(), 1.0 / latents.std().item()
