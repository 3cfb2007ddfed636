"""Train a pixel decoder: a flow-matching DiT from condition features to VAE latents.

BLIP3-o decodes generated CLIP features to pixels with a diffusion model conditioned
on them. unizoo trains the same thing on the recipe's data: targets are the VAE's
latent tokens of an image, the condition is the features of the same image.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from unizoo.pretraining.batches import endless
from unizoo.schedules import warmup_cosine

log = logging.getLogger(__name__)


def train_pixel_decoder(
    generator: nn.Module,
    objective: nn.Module,
    encode_targets: Callable[[torch.Tensor], torch.Tensor],
    encode_condition: Callable[[torch.Tensor], torch.Tensor],
    loader: DataLoader,
    steps: int,
    lr: float = 1e-3,
    seed: int = 0,
) -> float:
    """Train `generator` in place so that `objective.sample(generator, encode_condition(x))` ≈ `encode_targets(x)`."""
    torch.manual_seed(seed)
    generator.train()
    optimizer = torch.optim.AdamW(generator.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(min(50, steps // 2 + 1), steps))
    batches = endless(loader)
    start = time.perf_counter()
    progress = tqdm(range(steps), desc="training pixel decoder", dynamic_ncols=True)
    for _ in progress:
        images = next(batches)["image"]
        with torch.no_grad():
            targets, condition = encode_targets(images), encode_condition(images)
        loss = objective.loss(generator, targets, condition)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.4f}")
    generator.eval()
    log.info("pixel decoder trained for %d steps in %.0f s (loss %.4f)", steps, time.perf_counter() - start, loss.item())
    return loss.item()
