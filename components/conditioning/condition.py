"""What a generator reads besides its noisy tokens and time: condition tokens, and which of them are real.

A condition is either a plain tensor, every token real (today's query tokens, ``(B, Q, D)``),
or a :class:`Condition`, tokens with a padding mask (a caption's tokens, left-padded to the
longest caption of the batch). Its tokens are ``(B, T, D)``, or ``(B, S, T, D)`` for S stacks
of them (one per backbone layer: ``conditioning=layerwise``), and the mask ``(B, T)`` is
shared by every stack.

Objectives never look inside: they read ``cond.shape[0]``, ``cond.device`` and ``cond.dtype``,
hand the condition to ``generator.drop_condition`` and to the generator, and join two along
the batch with :func:`join_conditions` (classifier-free guidance). A :class:`Condition` has
those three attributes, so a plain tensor and a masked condition go through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Condition:
    """Condition tokens ``(B, T, D)`` or ``(B, S, T, D)`` and their padding mask ``(B, T)`` (bool, True = real)."""

    tokens: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.tokens.dim() not in (3, 4):
            raise ValueError(f"condition tokens must be (B, T, D) or (B, S, T, D), got {tuple(self.tokens.shape)}")
        expected = (self.tokens.shape[0], self.tokens.shape[-2])
        if tuple(self.mask.shape) != expected:
            raise ValueError(f"condition mask must be (B, T) = {expected}, got {tuple(self.mask.shape)}")

    @property
    def shape(self) -> torch.Size:
        return self.tokens.shape

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tokens.dtype

    def rows(self, index: torch.Tensor) -> Condition:
        """The batch rows ``index (R,)`` (long): tokens and mask alike."""
        return Condition(self.tokens.index_select(0, index), self.mask.index_select(0, index))


def condition_parts(cond: torch.Tensor | Condition, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(tokens, mask)`` of a condition: a plain tensor keeps the mask it was given (None: every token real)."""
    if isinstance(cond, Condition):
        return cond.tokens, cond.mask
    return cond, mask


def join_conditions(first: torch.Tensor | Condition, second: torch.Tensor | Condition) -> torch.Tensor | Condition:
    """Two conditions of the same kind and length concatenated along the batch (``torch.cat`` for tensors)."""
    if isinstance(first, Condition):
        return Condition(torch.cat([first.tokens, second.tokens]), torch.cat([first.mask, second.mask]))
    return torch.cat([first, second])


def select_rows(cond: torch.Tensor | Condition, index: torch.Tensor) -> torch.Tensor | Condition:
    """The batch rows ``index (R,)`` of a condition of either kind."""
    return cond.rows(index) if isinstance(cond, Condition) else cond.index_select(0, index)
