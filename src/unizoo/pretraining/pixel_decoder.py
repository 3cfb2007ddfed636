"""Train a pixel decoder: a flow-matching DiT from condition features to VAE latents.

BLIP3-o decodes generated CLIP features to pixels with a diffusion model conditioned
on them. unizoo trains the same thing on the recipe's data: targets are the VAE's
latent tokens of an image, the condition is the features of the same image.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn
from torch.utils.data import DataLoader

from unizoo.pretraining.batches import endless
from unizoo.runtime.fabric import describe, loop_fabric, optimise
from unizoo.runtime.progress import LoopProgress
from unizoo.runtime.schedules import warmup_cosine

log = logging.getLogger(__name__)


def augment_with_noise(features: torch.Tensor, noise_std: float) -> torch.Tensor:
    """`features (B, N, C)` plus Gaussian noise whose std is drawn per sample from |N(0, noise_std²)|."""
    std = torch.randn(features.shape[0], *([1] * (features.dim() - 1)), device=features.device).abs() * noise_std
    return features + std.to(features.dtype) * torch.randn_like(features)


def train_pixel_decoder(
    generator: nn.Module,
    objective: nn.Module,
    encode_targets: Callable[[torch.Tensor], torch.Tensor],
    encode_condition: Callable[[torch.Tensor], torch.Tensor],
    loader: DataLoader,
    steps: int,
    lr: float = 1e-3,
    noise_std: float = 0.0,
    seed: int = 0,
    precision: Literal["32-true", "bf16-mixed", "auto"] = "32-true",
) -> float:
    """Train `generator` in place so that `objective.sample(generator, encode_condition(x))` ≈ `encode_targets(x)`.

    `noise_std` > 0 trains on noise-augmented features, as RAE's decoders are (arXiv 2510.11690):
    each image's features get Gaussian noise of a standard deviation drawn from |N(0, noise_std²)|,
    so the decoder learns to render features that are near, not on, the real ones, which is
    what a generator produces. It runs on the run's device (`encode_targets` and
    `encode_condition` are given that device's images); the weights are back on the CPU after.
    """
    torch.manual_seed(seed)
    fabric = loop_fabric(precision)
    generator.train()
    optimizer = torch.optim.AdamW(generator.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    generator, optimizer = fabric.setup(generator, optimizer)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(min(50, steps // 2 + 1), steps))
    batches = endless(loader)
    start = time.perf_counter()
    progress = LoopProgress(f"training pixel decoder ({describe(fabric)})", steps)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        images = fabric.to_device(next(batches)["image"])
        with torch.no_grad():
            targets, condition = encode_targets(images), encode_condition(images)
            if noise_std > 0:
                condition = augment_with_noise(condition, noise_std)
        with fabric.autocast():
            loss = objective.loss(generator, targets, condition)
        optimise(fabric, optimizer, loss, schedule)
        progress.step(lambda: {"loss": loss.item()})
    final = loss.item()
    progress.close({"loss": final})
    generator.module.to("cpu").eval()
    log.info("pixel decoder trained for %d steps (%s) in %.0f s (loss %.4f)", steps, describe(fabric), time.perf_counter() - start, final)
    return final
