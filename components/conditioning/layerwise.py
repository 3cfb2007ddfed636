"""Layer-by-layer conditioning (Tang et al., "Exploring the Deep Fusion of Large Language Models and
Diffusion Transformers for Text-to-Image Synthesis"): the generator reads the backbone's hidden
states of every layer, not only the last.

The condition is ``(B, S, T, D)``: S = the LM's layers. A DiT of depth N reads them spread over
its blocks, block i (of N) the layer ``ceil((i + 1) S / N)`` (counting from 1), so the first
blocks read shallow, the last block the final states (the DiT's rule for stacked conditions,
``components/generators/dit.py``). Each block cross-attends to its layer as the shallow read
cross-attends to the last one: the same layers, the same parameters; only what they read
changes. ``positions: all`` reads the caption's tokens and the queries (padding masked),
``queries`` the Q queries alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .condition import Condition
from .positions import Positions, check_positions, read_positions


class LayerwiseConditioning(nn.Module):
    """``conditioning(backbone, captions)``: every layer's states ``(B, S, T, D)`` (with the padding mask for ``all``)."""

    generator_arguments: dict[str, Any] = {}

    def __init__(self, positions: Positions = "all") -> None:
        super().__init__()
        self.positions = check_positions(positions)

    def forward(self, backbone: nn.Module, captions: list[str]) -> torch.Tensor | Condition:
        states, mask = backbone.hidden_states(captions)
        return read_positions(states, mask, self.positions, backbone.num_queries)
