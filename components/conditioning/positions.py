"""Which of the backbone's generation positions a deep conditioning reads: the whole sequence or its queries."""

from __future__ import annotations

from typing import Literal

import torch

from .condition import Condition

POSITIONS = ("all", "queries")
Positions = Literal["all", "queries"]


def check_positions(positions: str) -> str:
    if positions not in POSITIONS:
        raise ValueError(f"conditioning.positions={positions!r}; valid choices: {', '.join(POSITIONS)}")
    return positions


def read_positions(states: torch.Tensor, mask: torch.Tensor, positions: str, num_queries: int) -> torch.Tensor | Condition:
    """States ``(B, S, T, D)`` (or ``(B, T, D)``) at the chosen positions.

    ``all``: every position, as a :class:`Condition` with the padding mask ``(B, T)``; padded
    positions are set to 0, so whatever the LM computed there (finite or not) never reaches the
    generator's arithmetic, masked or not. ``queries``: the last ``num_queries`` positions, never
    padding, as a plain tensor.
    """
    if positions == "queries":
        return states[..., -num_queries:, :]
    keep = mask.view(mask.shape[0], *([1] * (states.dim() - 3)), mask.shape[1], 1)
    return Condition(torch.where(keep, states, torch.zeros((), dtype=states.dtype, device=states.device)), mask)
