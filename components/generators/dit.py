"""DiT: a diffusion / flow-matching transformer over token sequences.

Follows DiT (Peebles & Xie, 2023): adaLN-Zero blocks whose residual branches start
switched off, so a new model is the identity on its token stream and outputs exactly
0 (FinalLayer is zero-initialised too). The layers are in :mod:`.dit_blocks`; this file
assembles them. Differences from the class-conditional original:

* tokens come in already patchified (latent patches or CLIP features), ``(B, N, C)``;
* the condition is a token sequence ``(B, Q, D)`` read by cross-attention in every
  block (PixArt-style), with a learned null condition for classifier-free guidance;
  or a stack of them ``(B, S, T, D)``, one per backbone layer, spread over the blocks
  (``conditioning=layerwise``); or text tokens that share each block's self-attention
  with the image tokens (``condition_attention="joint"``, MM-DiT: :mod:`.joint_attention`).
  Masked conditions (:class:`~unizoo.components.conditioning.condition.Condition`) carry
  the padding of a caption's tokens;
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

from unizoo.components.conditioning.condition import Condition, condition_parts
from unizoo.runtime.fabric import loop_device, placement
from unizoo.runtime.precision import compute_dtype

from .attention import require_backend
from .dit_blocks import DiTBlock, FinalLayer, TimestepEmbedder
from .joint_attention import JointDiTBlock

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


# How the blocks read the condition: by cross-attention (DiTBlock) or in a self-attention shared
# with the image tokens (JointDiTBlock, MM-DiT). Set by the conditioning recipe group.
CONDITION_ATTENTIONS = {"cross": DiTBlock, "joint": JointDiTBlock}


def stack_of_block(position: int, stacks: int, blocks: int) -> int:
    """The condition stack block ``position`` (of ``blocks`` run in a row) reads: ``ceil((position + 1) S / blocks) - 1``.

    Stacks (backbone layers) spread evenly over the blocks, the last block reading the last
    stack; with one stack every block reads it.
    """
    return -(-(position + 1) * stacks // blocks) - 1


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
        condition_attention: ``"cross"`` (each block cross-attends to the condition) or
            ``"joint"`` (text and image tokens share each block's self-attention, MM-DiT); the
            same parameter count either way. Set by ``conditioning=joint_attention``.
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
        condition_attention: str = "cross",
    ):
        super().__init__()
        if condition_attention not in CONDITION_ATTENTIONS:
            raise ValueError(
                f"generator.condition_attention={condition_attention!r}; valid choices: {', '.join(CONDITION_ATTENTIONS)} "
                "(set by the conditioning recipe group: conditioning=joint_attention builds joint)"
            )
        self.condition_attention = condition_attention
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
        block = CONDITION_ATTENTIONS[condition_attention]
        self.blocks = nn.ModuleList(block(hidden_size, num_heads, mlp_ratio, attention_backend, adaln) for _ in range(depth))
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
            zero += block.condition_outputs()
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
            block.set_attention_backend(backend)

    def drop_condition(self, cond: torch.Tensor | Condition, drop: torch.Tensor) -> torch.Tensor | Condition:
        """Replace the whole sequence of rows where ``drop (B,)`` is True by the null token.

        ``cond (B, Q, D)`` (or ``(B, S, T, D)``) -> the same shape; the null token is broadcast
        over every position. A masked :class:`Condition` stays one, and a dropped row's mask keeps
        a single real token (the last position): the unconditional input is then the same for
        every prompt, whatever the length of the captions padded into its batch.
        """
        tokens, mask = condition_parts(cond)
        null = self.null_condition.to(tokens.dtype).expand_as(tokens)
        drop = drop.to(torch.bool)
        dropped = torch.where(drop.view(-1, *([1] * (tokens.dim() - 1))), null, tokens)
        if mask is None:
            return dropped
        last_only = torch.zeros_like(mask, dtype=torch.bool)
        last_only[:, -1] = True
        return Condition(dropped, torch.where(drop.view(-1, 1), last_only, mask.to(torch.bool)))

    def forward(self, x, t, cond, cond_mask=None):
        """Predict ``(B, N, C)``.

        Args:
            x: ``(B, N, C)`` noisy tokens.
            t: ``(B,)`` float time in [0, 1].
            cond: ``(B, Q, D)`` condition tokens, ``(B, S, Q, D)`` stacks of them (block i reads
                stack :func:`stack_of_block`), or a :class:`Condition` (tokens and their mask).
            cond_mask: optional bool ``(B, Q)``, True = real token (a :class:`Condition` brings its own).
        """
        x, c, block_c, stacks, cond_mask = self.embed(x, t, cond, cond_mask)
        x = self.run_blocks(range(self.depth), x, block_c, stacks, cond_mask)
        return self.final_layer(x, c)

    def embed(self, x, t, cond, cond_mask=None):
        """Everything before the blocks: ``(x (B, N, H), c (B, H), block_c, stacks (B, S, T, H), mask (B, T) | None)``.

        ``c`` is the adaLN vector (time and pooled condition), ``block_c`` what the blocks are
        modulated with (``c``, or its shared projection with adaLN-single), ``stacks`` the
        embedded condition (S = 1 for a plain ``(B, Q, D)`` condition).
        """
        if x.shape[1:] != (self.num_tokens, self.token_dim):
            raise ValueError(
                f"x must be (B, {self.num_tokens}, {self.token_dim}), got {tuple(x.shape)}"
            )
        tokens, cond_mask = condition_parts(cond, cond_mask)
        if tokens.dim() == 3:  # one stack; a view, so the arithmetic is that of the (B, Q, D) tensor
            tokens = tokens.unsqueeze(1)
        if self.condition_attention == "joint" and tokens.shape[1] != 1:
            raise ValueError(
                f"a generator with joint attention carries one text stream through its blocks: it reads one stack of "
                f"condition tokens, got {tokens.shape[1]} (conditioning=layerwise is read by cross-attention)"
            )
        x = self.x_embedder(x) + self.pos_embed
        stacks = self.cond_embedder(tokens)
        last = stacks[:, -1]
        if self.aligned_condition:
            if last.shape[1] != self.num_tokens:
                raise ValueError(f"aligned_condition needs one condition token per token: {last.shape[1]} != {self.num_tokens}")
            x = x + last
        c = self.t_embedder(t) + self.pooled_embedder(_masked_mean(last, cond_mask))
        block_c = c if self.shared_modulation is None else self.shared_modulation(c)
        return x, c, block_c, stacks, cond_mask

    def run_blocks(self, indices, x, block_c, stacks, cond_mask=None):
        """Run the blocks ``indices`` in order on ``x (B, N, H)``, reading the embedded condition ``stacks (B, S, T, H)``.

        Cross-attention blocks read stack :func:`stack_of_block` of their position among
        ``indices``; joint-attention blocks carry the text stream from one block to the next,
        starting from the condition's tokens.
        """
        indices = list(indices)
        text = stacks[:, 0]
        for position, index in enumerate(indices):
            block = self.blocks[index]
            if self.condition_attention == "joint":
                x, text = self._call(block, x, block_c, text, cond_mask)
            else:
                x = self._call(block, x, block_c, stacks[:, stack_of_block(position, stacks.shape[1], len(indices))], cond_mask)
        return x

    def _call(self, block, *inputs):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *inputs, use_reentrant=False)
        return block(*inputs)


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
