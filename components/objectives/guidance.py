"""Classifier-free guidance, shared by every objective's sampler."""

from __future__ import annotations

import math

import torch
from torch import nn

from unizoo.components.conditioning.condition import Condition, join_conditions


def guided(
    generator: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | Condition, guidance: float
) -> torch.Tensor:
    """`uncond + guidance * (cond - uncond)` of the generator's output; one plain call when guidance is 1.

    Both branches run as one batched forward ([conditional; unconditional]); the
    unconditional branch sees the generator's learned null condition.
    """
    if math.isclose(guidance, 1.0):
        return generator(x, t, cond)
    null = generator.drop_condition(cond, torch.ones(cond.shape[0], dtype=torch.bool, device=cond.device))
    pred_cond, pred_uncond = generator(torch.cat([x, x]), torch.cat([t, t]), join_conditions(cond, null)).chunk(2)
    return pred_uncond + guidance * (pred_cond - pred_uncond)
