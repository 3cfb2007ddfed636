"""Bringing an encoder's features to unit scale: what the CLIP and SSL representations share.

A representation that keeps `feature_shift` and `feature_scale` buffers (shape `(C,)` per
channel, `()` otherwise) and applies them in `encode` as `(tokens - shift) * scale` fits
them here on real training images.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

# How features are brought to unit scale: one shift/scale per channel, one for all channels, or not at all.
NORMALISATIONS = ("channel", "scalar", "none")
# Real images the normalisation is fitted on: enough for a stable mean/std per channel, cheap for a big tower.
NORMALISATION_BATCHES = 8


def check_normalisation(normalize: str) -> str:
    if normalize not in NORMALISATIONS:
        raise ValueError(f"representation.normalize={normalize!r}; valid choices: {', '.join(NORMALISATIONS)}")
    return normalize


def rounded(values: torch.Tensor) -> list[float] | float:
    """Statistics as plain numbers for a cache key, rounded so float noise does not change it."""
    return [round(v, 6) for v in values.tolist()] if values.dim() else round(values.item(), 6)


@torch.no_grad()
def fit_normalisation(representation: nn.Module, loader: Any) -> None:
    """Set `representation`'s `feature_shift` / `feature_scale` from `NORMALISATION_BATCHES` batches of `loader`.

    "scalar": one shift and scale for all channels (like the VAE's latent scaling): unit
    scale overall, channels keep their relative sizes. "channel": every channel zero-mean,
    unit-std, so the generator's error budget is spread evenly over channels instead of
    being spent on the widest ones (RAE normalises its encoders' features per channel).
    """
    representation.feature_shift.zero_()
    representation.feature_scale.fill_(1.0)
    batches = itertools.islice(loader, NORMALISATION_BATCHES)
    features = torch.cat([representation.encode(batch["image"]) for batch in batches]).float()
    if representation.normalize == "channel":
        flat = features.reshape(-1, features.shape[-1])
        representation.feature_shift.copy_(flat.mean(0))
        representation.feature_scale.copy_(1.0 / flat.std(0).clamp_min(1e-6))
    else:
        representation.feature_shift.fill_(features.mean().item())
        representation.feature_scale.fill_(1.0 / features.std().item())
