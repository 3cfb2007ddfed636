"""DiT: a diffusion / flow-matching transformer over token sequences.

Follows DiT (Peebles & Xie, 2023): adaLN-Zero blocks whose residual branches start
switched off, so a new model is the identity on its token stream and outputs exactly
0 (FinalLayer is zero-initialised too). Differences from the class-conditional
original:

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

from .attention import attention, check_backend

DIT_SIZES = {
    "tiny": dict(depth=4, hidden_size=128, num_heads=4),
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x (B, N, C)`` scaled and shifted per sample by ``(B, C)`` vectors.

    One fused ``shift + x * (1 + scale)`` pass over the activations instead of two.
    """
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def gated_residual(x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """adaLN-Zero residual ``x + gate * branch`` for a per-sample ``gate (B, C)``, as one fused op."""
    return torch.addcmul(x, gate.unsqueeze(1), branch)


# sqrt(2 / pi), the tanh-GELU's inner scale, doubled: 0.5 * (1 + tanh(z)) == sigmoid(2 z).
_TWO_SQRT_2_OVER_PI = 2 * math.sqrt(2 / math.pi)


class TanhGELU(nn.Module):
    """GELU with the tanh approximation (DiT's MLP activation), ``nn.GELU(approximate="tanh")``.

    Eager PyTorch has one fused kernel for it, which runs as is. Under ``torch.compile`` the
    same function is written as ``x * sigmoid(2 z)``, ``z = sqrt(2/pi) (x + 0.044715 x^3)``:
    ``0.5 (1 + tanh(z))`` equals ``sigmoid(2 z)`` exactly (the two agree to 2.4e-7 in fp32),
    and inductor's CPU code for sigmoid (one exp) is much cheaper than for tanh. Forward +
    backward of the activation at DiT-S/2's MLP width (bf16, 8 x 256 x 1536) went from 7.5 to
    3.7 ms on a 2-core Xeon, about 9% of a compiled DiT-S/2 training step.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return x * torch.sigmoid(_TWO_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
        return nn.functional.gelu(x, approximate="tanh")


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


class TimestepEmbedder(nn.Module):
    """Flow-matching time ``t (B,)`` in [0, 1] -> ``(B, hidden)``.

    ``t`` is scaled by 1000 before the sinusoid: the frequency range (max_period
    10000) was designed for DDPM's integer steps 0..999, and on raw [0, 1] most
    channels would be near-constant.
    """

    def __init__(self, hidden_size: int, frequency_size: int = 256, time_scale: float = 1000.0):
        super().__init__()
        self.frequency_size = frequency_size
        self.time_scale = time_scale
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(
            -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = (t.float() * self.time_scale)[:, None] * freqs[None]
        emb = torch.cat([args.cos(), args.sin()], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class SelfAttention(nn.Module):
    """Multi-head self-attention over ``(B, N, C)`` with one fused qkv projection."""

    def __init__(self, hidden_size: int, num_heads: int, backend: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self.backend = backend
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        # (B, N, 3, H, K) -> three [B, N, H, K] views, the layout attention() takes.
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).unbind(2)
        return self.proj(attention(q, k, v, backend=self.backend).reshape(B, N, C))


class CrossAttention(nn.Module):
    """Queries from ``x (B, N, C)``, keys/values from ``cond (B, Q, C)`` (masked)."""

    def __init__(self, hidden_size: int, num_heads: int, backend: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self.backend = backend
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x, cond, cond_mask=None):
        B, N, C = x.shape
        if cond.shape[1] == 1:
            return self._single_token(x, cond, cond_mask)
        H, K = self.num_heads, C // self.num_heads
        q = self.q(x).view(B, N, H, K)
        k, v = self.kv(cond).view(B, cond.shape[1], 2, H, K).unbind(2)
        out = attention(q, k, v, key_padding_mask=cond_mask, backend=self.backend)
        return self.proj(out.reshape(B, N, C))

    def _single_token(self, x, cond, cond_mask):
        """Exact shortcut for a one-token condition (a class, a pooled caption).

        Softmax over a single key is 1 whatever the query, so every token reads that
        key's value: the output is ``proj(v)`` of the one token, broadcast over N.
        That skips the query projection, the attention and N - 1 of the N output
        projections (DiT-S/2: 13% of a training step's FLOPs). The query side (the
        block's ``norm_cross`` and ``q``) gets no gradient on this path (``None``, which
        optimisers skip; DDP needs ``find_unused_parameters`` for such a model).
        """
        B, N, C = x.shape
        value = nn.functional.linear(cond, self.kv.weight[C:], self.kv.bias[C:])  # (B, 1, C)
        if cond_mask is not None:  # a masked-out only key: attention() reads nothing -> 0
            value = value * cond_mask.to(device=value.device, dtype=value.dtype).unsqueeze(-1)
        return self.proj(value).expand(B, N, C)


ADALN_MODES = ("zero", "single")


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention, cross-attention to the condition, adaLN-Zero MLP.

    Residual gates (self-attention, MLP) and the cross-attention output projection
    are zero-initialised by :class:`DiT`, so a new block is the identity.

    ``adaln="zero"``: the block projects the conditioning vector ``c (B, C)`` to its
    six modulation vectors with its own Linear. ``adaln="single"``: the model has
    projected ``c`` once for all blocks (``(B, 6·C)``); the block adds its own learned
    ``(6, C)`` table (PixArt-alpha, sec. 2.3). Both start at zero, so either way the
    gates are 0 and a new block is the identity.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, backend="auto",
                 adaln: str = "zero"):
        super().__init__()
        if adaln not in ADALN_MODES:
            raise ValueError(f"unknown adaln {adaln!r}; choose one of {list(ADALN_MODES)}")
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads, backend)
        # The condition does not depend on t, so cross-attention gets a plain
        # (affine) pre-norm rather than adaLN.
        self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
        self.cross_attn = CrossAttention(hidden_size, num_heads, backend)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden),
            TanhGELU(),
            nn.Linear(mlp_hidden, hidden_size),
        )
        # Only one of the two exists, under the name checkpoints of that mode carry.
        if adaln == "zero":
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        else:
            self.scale_shift_table = nn.Parameter(torch.zeros(6, hidden_size))

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The six ``(B, C)`` vectors: shift, scale, gate of self-attention, then of the MLP."""
        if hasattr(self, "scale_shift_table"):  # c is the shared projection (B, 6C)
            return (c.unflatten(1, (6, -1)) + self.scale_shift_table.to(c.dtype)).unbind(1)
        return self.adaLN_modulation(c).chunk(6, dim=1)

    def forward(self, x, c, cond, cond_mask=None):
        """``x (B, N, C)``, ``c`` (``(B, C)``, or ``(B, 6C)`` with adaln="single"),
        ``cond (B, Q, C)``, ``cond_mask (B, Q)`` -> ``(B, N, C)``."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c)
        x = gated_residual(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        # With a one-token condition the cross-attention output does not depend on x at
        # all (see CrossAttention._single_token), so its pre-norm is skipped too.
        x = x + self.cross_attn(x if cond.shape[1] == 1 else self.norm_cross(x), cond, cond_mask)
        x = gated_residual(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated norm + Linear(hidden -> token_dim): ``(B, N, hidden) -> (B, N, C)``."""

    def __init__(self, hidden_size: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


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
        """Switch the attention kernel of every block (weights unchanged)."""
        check_backend(backend)
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
