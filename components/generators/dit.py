"""DiT: a diffusion / flow-matching transformer over token sequences.

Follows DiT (Peebles & Xie, 2023): adaLN-Zero blocks whose residual branches start
switched off, so a new model is the identity on its token stream and outputs exactly
0 (FinalLayer is zero-initialised too). The layers are in :mod:`.dit_blocks`; this file
assembles them. Differences from the class-conditional original:

* tokens come in already patchified (latent patches or CLIP features), ``(B, N, C)``;
* the condition is a token sequence ``(B, Q, D)`` read by cross-attention in every
  block (PixArt-style), with a learned null condition for classifier-free guidance;
* the timestep is a flow-matching time ``t`` in [0, 1] rather than an integer step;
* the modulation is ``adaln="zero"`` (DiT's: a ``Linear(width, 6·width)`` per block)
  or ``adaln="single"`` (PixArt-alpha's adaLN-single: one shared projection and a
  learned ``(6, width)`` table per block, a quarter fewer parameters at DiT-S).

Sizes are named presets (``DIT_SIZES``); recipes build models through :func:`dit`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from unizoo.runtime.fabric import loop_device, placement
from unizoo.runtime.precision import compute_dtype

from .attention import require_backend
from .dit_blocks import DiTBlock, FinalLayer, TimestepEmbedder

DIT_SIZES = {
    "tiny": dict(depth=4, hidden_size=128, num_heads=4),
    # tiny's width, twice its blocks: for wide targets (64-channel CLIP tokens), where the
    # noisy end of the path needs every token to agree on one layout (README, CLIP section).
    "tiny_deep": dict(depth=8, hidden_size=128, num_heads=4),
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """``(L,)`` positions -> ``(L, dim)`` [sin | cos] features (transformer style)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dim, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_pos_embed(num_tokens: int, dim: int) -> torch.Tensor:
    """Fixed position table ``(1, N, dim)``: 2-D over a sqrt(N) grid when N is square.

    2-D (half the channels per axis) tells the model which tokens are vertical
    neighbours in a patchified image; other sequences get 1-D positions.
    """
    side = math.isqrt(num_tokens)
    if side * side == num_tokens:
        if dim % 4:
            raise ValueError(f"2-D sin-cos embedding needs dim divisible by 4, got {dim}")
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        table = torch.cat(
            [sincos_1d(rows.flatten(), dim // 2), sincos_1d(cols.flatten(), dim // 2)], dim=1
        )
    else:
        table = sincos_1d(torch.arange(num_tokens), dim)
    return table.unsqueeze(0)


class DiT(nn.Module):
    """Condition-to-token generator: predicts ``(B, N, C)`` from noisy tokens, t and a condition.

    Args:
        token_dim: C, channels per target token.
        num_tokens: N, fixed sequence length (sets the position table).
        condition_dim: D, channels per condition token.
        hidden_size, depth, num_heads, mlp_ratio: transformer size (see ``DIT_SIZES``).
        attention_backend: one of ``attention.BACKENDS``, used by every block.
        gradient_checkpointing: recompute each block in backward to save activations.
        aligned_condition: also add condition token i to token i (needs Q == N; image-feature decoders).
        adaln: ``"zero"`` (a modulation Linear per block, DiT) or ``"single"`` (one shared
            Linear plus a per-block table, PixArt-alpha's adaLN-single); see :class:`DiTBlock`.
    """

    def __init__(
        self,
        token_dim: int,
        num_tokens: int,
        condition_dim: int,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        attention_backend: str = "auto",
        gradient_checkpointing: bool = False,
        aligned_condition: bool = False,
        adaln: str = "zero",
    ):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} not divisible by num_heads {num_heads}")
        self.token_dim, self.num_tokens, self.condition_dim = token_dim, num_tokens, condition_dim
        self.hidden_size, self.depth, self.num_heads = hidden_size, depth, num_heads
        self.gradient_checkpointing = gradient_checkpointing
        # A condition laid out on the same grid as the tokens (a decoder's image features)
        # is also added token by token to the input: cross-attention alone has to
        # rediscover which condition token sits where.
        self.aligned_condition = aligned_condition

        self.x_embedder = nn.Linear(token_dim, hidden_size)
        # Fixed, not learned (as DiT); rebuilt from N at construction, so not saved.
        self.register_buffer("pos_embed", sincos_pos_embed(num_tokens, hidden_size), persistent=False)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.cond_embedder = nn.Sequential(nn.LayerNorm(condition_dim), nn.Linear(condition_dim, hidden_size))
        # The mean-pooled condition joins t in the adaLN vector: every block (and the
        # final layer) gets a global summary of the prompt for free, which cross-
        # attention alone only provides after its zero-init projection has grown.
        # Cheap, and it makes small models learn the conditioning much faster.
        self.pooled_embedder = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        # Classifier-free guidance: stands in for "no condition" (see drop_condition).
        self.null_condition = nn.Parameter(torch.zeros(1, 1, condition_dim))
        self.adaln = adaln
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, attention_backend, adaln) for _ in range(depth)
        )
        # adaLN-single: the one projection of c every block's table is added to.
        self.shared_modulation = (
            nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size)) if adaln == "single" else None
        )
        self.final_layer = FinalLayer(hidden_size, token_dim)
        self.set_attention_backend(attention_backend)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT init: xavier linears, then zero every branch that must start switched off."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        nn.init.normal_(self.null_condition, std=0.02)
        zero = [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        if self.shared_modulation is not None:
            zero.append(self.shared_modulation[-1])  # the tables start at 0 too (DiTBlock)
        for block in self.blocks:
            # adaLN-Zero gates -> self-attn and MLP branches are 0; a zero output
            # projection does the same for the (ungated) cross-attention branch.
            zero += [block.cross_attn.proj]
            if hasattr(block, "adaLN_modulation"):
                zero.append(block.adaLN_modulation[-1])
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def token_shape(self) -> tuple[int, int]:
        """(N, C): the shape of one sample's tokens, which samplers draw noise in."""
        return self.num_tokens, self.token_dim

    def set_attention_backend(self, backend: str) -> None:
        """Switch the attention kernel of every block (weights unchanged).

        A kernel named explicitly (not auto or sdpa) is probed on the run's device and dtype first,
        so a recipe asking for a kernel that cannot run here stops before anything trains.
        """
        require_backend(backend, loop_device(), compute_dtype(placement().precision), self.hidden_size // self.num_heads,
                        key="generator.attention_backend")
        self.attention_backend = backend
        for block in self.blocks:
            block.attn.backend = block.cross_attn.backend = backend

    def drop_condition(self, cond: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """Replace the whole sequence of rows where ``drop (B,)`` is True by the null token.

        ``cond (B, Q, D)`` -> ``(B, Q, D)``; the null token is broadcast over Q.
        """
        null = self.null_condition.to(cond.dtype).expand_as(cond)
        return torch.where(drop.to(torch.bool).view(-1, 1, 1), null, cond)

    def forward(self, x, t, cond, cond_mask=None):
        """Predict ``(B, N, C)``.

        Args:
            x: ``(B, N, C)`` noisy tokens.
            t: ``(B,)`` float time in [0, 1].
            cond: ``(B, Q, D)`` condition tokens.
            cond_mask: optional bool ``(B, Q)``, True = real token.
        """
        if x.shape[1:] != (self.num_tokens, self.token_dim):
            raise ValueError(
                f"x must be (B, {self.num_tokens}, {self.token_dim}), got {tuple(x.shape)}"
            )
        x = self.x_embedder(x) + self.pos_embed
        cond = self.cond_embedder(cond)
        if self.aligned_condition:
            if cond.shape[1] != self.num_tokens:
                raise ValueError(f"aligned_condition needs one condition token per token: {cond.shape[1]} != {self.num_tokens}")
            x = x + cond
        c = self.t_embedder(t) + self.pooled_embedder(_masked_mean(cond, cond_mask))
        block_c = c if self.shared_modulation is None else self.shared_modulation(c)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, block_c, cond, cond_mask, use_reentrant=False)
            else:
                x = block(x, block_c, cond, cond_mask)
        return self.final_layer(x, c)


def _masked_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``(B, Q, C)`` over valid tokens -> ``(B, C)``; an all-masked row gives 0."""
    if mask is None:
        return tokens.mean(dim=1)
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def dit(size: str = "tiny", **overrides) -> DiT:
    """Build a DiT from a preset in ``DIT_SIZES``; keyword overrides win over the preset.

    ``dit("S", token_dim=4, num_tokens=256, condition_dim=768, depth=6)``.
    """
    if size not in DIT_SIZES:
        raise ValueError(f"unknown DiT size {size!r}; choose one of {list(DIT_SIZES)}")
    return DiT(**{**DIT_SIZES[size], **overrides})
