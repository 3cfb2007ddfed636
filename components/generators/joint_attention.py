"""A DiT block whose self-attention text and image tokens share (MM-DiT, Esser et al. 2024, SD3).

Where :class:`.dit_blocks.DiTBlock` lets image tokens read the condition through a
cross-attention, this block runs one attention over the concatenation ``[text; image]``:
every image token attends to the text tokens and to the other image tokens in the same
softmax, and the text tokens attend to both as well. The two modalities keep their own
weights: the image tokens use the block's self-attention projections (``attn.qkv``,
``attn.proj``) under adaLN, the text tokens a qkv and an output projection of their own
behind an affine pre-norm (the condition does not depend on t). The text tokens leave the
block updated and the next block reads them: a text stream through the generator, as in
MM-DiT.

What it omits from MM-DiT, and why: the text stream has no MLP and no adaLN of its own. That
keeps the block's parameters those of the cross-attention block exactly (cross-attention:
q, kv and output projections, 4 h² + 4 h, and an affine pre-norm, 2 h; here: the text qkv and
output projections, 4 h² + 4 h, and the text pre-norm, 2 h), so a study compares the way of
reading the condition at an equal parameter count, not a bigger generator.

Padding: the text tokens come with a key padding mask ``(B, T)``; the joint mask is
``[mask; ones(N)]``, so no token, image or text, attends to a padded text position.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import attention
from .dit_blocks import DiTBlock, gated_residual, modulate


class JointDiTBlock(DiTBlock):
    """adaLN-Zero joint self-attention over ``[text; image]``, then the adaLN-Zero MLP of the image tokens."""

    def add_condition_layers(self, hidden_size: int, num_heads: int, backend: str) -> None:
        self.norm_text = nn.LayerNorm(hidden_size, eps=1e-6)
        self.text_qkv = nn.Linear(hidden_size, 3 * hidden_size)
        # Zero-initialised by the DiT, as the cross-attention's output projection: the text stream
        # starts unchanged through the blocks.
        self.text_proj = nn.Linear(hidden_size, hidden_size)

    def condition_outputs(self) -> list[nn.Linear]:
        return [self.text_proj]

    def set_attention_backend(self, backend: str) -> None:
        self.attn.backend = backend

    def forward(self, x, c, text, text_mask=None):
        """``x (B, N, C)`` image tokens, ``c`` the adaLN vector, ``text (B, T, C)`` and its mask ``(B, T)``
        -> the updated ``(x, text)``."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c)
        B, N, C = x.shape
        T = text.shape[1]
        H = self.attn.num_heads
        image_qkv = self.attn.qkv(modulate(self.norm1(x), shift_msa, scale_msa)).view(B, N, 3, H, C // H)
        text_qkv = self.text_qkv(self.norm_text(text)).view(B, T, 3, H, C // H)
        q, k, v = torch.cat([text_qkv, image_qkv], dim=1).unbind(2)  # each (B, T + N, H, K)
        mask = None
        if text_mask is not None:
            mask = torch.cat([text_mask.to(device=x.device, dtype=torch.bool), text_mask.new_ones(B, N, dtype=torch.bool, device=x.device)], dim=1)
        out = attention(q, k, v, key_padding_mask=mask, backend=self.attn.backend).reshape(B, T + N, C)
        text_out, image_out = out.split([T, N], dim=1)
        x = gated_residual(x, gate_msa, self.attn.proj(image_out))
        text = text + self.text_proj(text_out)
        x = gated_residual(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x, text
