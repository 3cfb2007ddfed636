"""Joint attention (MM-DiT, SD3; the self-attention fusion Tang et al. compare): text and image tokens
share each block's self-attention.

The condition is the backbone's last hidden states over the caption's tokens and the queries
(``positions: all``, padding masked) or the queries alone (``queries``). The generator is built
with ``condition_attention="joint"``: each block runs one attention over ``[text; image]``, the
text tokens with their own qkv and output projections, carried from block to block as a stream
of their own (``components/generators/joint_attention.py``). A key padding mask keeps every
token, image or text, from attending to padding. Those projections replace the cross-attention's,
with the same shapes, so the generator's parameter count is the shallow one's exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .condition import Condition
from .positions import Positions, check_positions, read_positions


class JointAttentionConditioning(nn.Module):
    """``conditioning(backbone, captions)``: the last layer's states ``(B, T, D)``, for a generator with joint attention."""

    generator_arguments: dict[str, Any] = {"condition_attention": "joint"}

    def __init__(self, positions: Positions = "all") -> None:
        super().__init__()
        self.positions = check_positions(positions)

    def forward(self, backbone: nn.Module, captions: list[str]) -> torch.Tensor | Condition:
        states, mask = backbone.hidden_states(captions)
        return read_positions(states[:, -1], mask, self.positions, backbone.num_queries)
