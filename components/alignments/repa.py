"""REPA (Yu et al., arXiv 2410.06940): align the generator's hidden states with a frozen encoder's patch features.

An MLP projects the output of one early generator block, `(B, N, D)`, to the encoder's
width, and the loss pulls each projected token towards the clean image's feature of the
same patch: `1 - cos(projection, feature)`, averaged over tokens and images. REPA writes
it as `-cos`; the two differ by a constant, so the gradients are the same, and `1 - cos` is
exactly 0 when the projection equals the feature (a test holds it to that). The paper
finds the generator then learns a useful representation early instead of discovering one
from the denoising loss alone, and reports many times faster convergence.

The hidden states come from the forward pass that computes the objective's loss (the same
noise, timestep and dropped conditions; `capture` hooks the block), on the noisy target
tokens whatever the representation: VAE latents, CLIP or SSL features. The encoder is any
representation used encode-only (the tiny CLIP tower by default, `recipes/alignment/repa.yaml`;
a local CLIP / SigLIP / timm tower through its `pretrained`); its patch grid is resampled to
the generator's token grid when the two differ.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from unizoo.components.generators.hidden_states import BlockOutput, block_count, capture_block_output


def square_side(num_tokens: int, what: str) -> int:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"REPA needs {what} on a square grid of tokens, got {num_tokens} tokens")
    return side


def resample_tokens(tokens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """`(B, M, C)` on a square grid -> `(B, num_tokens, C)` on another square grid; identity if equal.

    To a coarser grid each token is the mean of the features its area covers (one generator
    token stands for that many encoder patches); to a finer one, bilinear interpolation.
    """
    if tokens.shape[1] == num_tokens:
        return tokens
    b, m, c = tokens.shape
    side, target = square_side(m, "the encoder's features"), square_side(num_tokens, "the generator's tokens")
    grid = tokens.transpose(1, 2).reshape(b, c, side, side).float()
    if target < side:
        resampled = F.adaptive_avg_pool2d(grid, target)
    else:
        resampled = F.interpolate(grid, size=(target, target), mode="bilinear", align_corners=False)
    return resampled.flatten(2).transpose(1, 2).to(tokens.dtype)


def alignment_loss(projected: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """`1 - cos` between `(B, N, C)` projected hidden states and features, token by token, averaged: in [0, 2]."""
    return (1 - F.cosine_similarity(projected.float(), features.float(), dim=-1)).mean()


class REPA(nn.Module):
    """REPA's projection head and loss, on block `block` of the generator, against `encoder`'s features."""

    def __init__(
        self,
        encoder: nn.Module,
        generator: nn.Module,
        weight: float = 0.5,
        block: int = 2,
        projector_width: int = 256,
    ) -> None:
        """`encoder`: a representation (`encode(images) -> (B, M, C)`, `prepare`, `token_shape`), frozen;
        `generator`: the model's generator (`build_model` hands it over), read for its width, depth and
        token grid; `weight`: the loss's weight beside the objective's; `block`: which block's output is
        aligned, counted from 1; `projector_width`: the MLP's hidden width."""
        super().__init__()
        if weight < 0:
            raise ValueError(f"alignment.weight={weight}: expected a weight of at least 0 (REPA uses 0.5)")
        depth = block_count(generator)
        if not 1 <= block <= depth:
            raise ValueError(
                f"alignment.block={block}: the generator has {depth} blocks, so choose 1..{depth} "
                "(REPA aligns an early one: block 8 of SiT-XL's 28)"
            )
        self.encoder, self.weight, self.block = encoder, float(weight), block
        self.num_tokens = generator.token_shape[0]
        square_side(encoder.token_shape[0], "the encoder's features")
        square_side(self.num_tokens, "the generator's tokens")
        width, features = generator.hidden_size, encoder.token_shape[1]
        # REPA's projector: a 3-layer MLP with SiLU, from the block's width to the encoder's.
        self.projector = nn.Sequential(
            nn.Linear(width, projector_width), nn.SiLU(),
            nn.Linear(projector_width, projector_width), nn.SiLU(),
            nn.Linear(projector_width, features),
        )

    def prepare(self, datamodule: Any) -> None:
        """Make the encoder's weights real (the tiny CLIP is pretrained once and cached)."""
        self.encoder.prepare(datamodule)

    def head_parameters(self) -> list[nn.Parameter]:
        """What trains with the generator: the projector (the encoder stays frozen)."""
        return list(self.projector.parameters())

    @contextmanager
    def capture(self, generator: nn.Module) -> Iterator[BlockOutput]:
        with capture_block_output(generator, self.block) as captured:
            yield captured

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """The clean images' `(B, 3, H, W)` features on the generator's grid, `(B, N, C)`."""
        return resample_tokens(self.encoder.encode(images), self.num_tokens)

    def loss(self, captured: BlockOutput, images: torch.Tensor) -> torch.Tensor:
        """`1 - cos` of the projected block output and the images' features (0 when they point the same way)."""
        return alignment_loss(self.projector(captured.value), self.targets(images))

    def terms(self, captured: BlockOutput, images: torch.Tensor) -> dict[str, tuple[torch.Tensor, float]]:
        """The loss term beside the objective's: `{"alignment": (loss, weight)}`."""
        return {"alignment": (self.loss(captured, images), self.weight)}
