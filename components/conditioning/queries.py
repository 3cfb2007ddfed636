"""Shallow conditioning (MetaQuery, BLIP3-o): the last hidden states of the backbone's Q query tokens.

``(B, Q, D)``, read by cross-attention in every generator block. The recipe default, and
exactly what unizoo did before conditioning was a recipe group.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class QueryConditioning(nn.Module):
    """``conditioning(backbone, captions) -> (B, Q, D)``: ``backbone.condition(captions)``, unchanged."""

    # The generator needs nothing beyond its defaults (cross-attention) to read it.
    generator_arguments: dict[str, Any] = {}

    def forward(self, backbone: nn.Module, captions: list[str]) -> torch.Tensor:
        return backbone.condition(captions)
