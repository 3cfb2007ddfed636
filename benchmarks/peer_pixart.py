"""The conditioned peer: diffusers' ``PixArtTransformer2DModel`` at unizoo's DiT size.

unizoo's generator reads Q condition tokens (the backbone's query hidden states) by
cross-attention in every block. PixArt-alpha's transformer is the diffusers model
made for that work: DiT blocks with cross-attention to a text sequence. Configured
here to the same depth, width, heads, patch, latent grid, condition length Q and
condition width D as unizoo's DiT in the same comparison:

* ``caption_channels=D``: PixArt projects the condition with its caption MLP
  (Linear D->width, GELU, Linear width->width); unizoo with LayerNorm + Linear D->width.
* ``norm_type="ada_norm_single"`` (PixArt's only one): one shared timestep MLP and
  ``Linear(width, 6·width)`` for the whole network plus a learned per-block table.
  unizoo's DiT does the same with ``adaln="single"``, which this comparison builds
  unless told otherwise (``peer_dit.PEER_ADALN``; ``--adaln zero`` on the command line).
  With ``adaln="zero"`` (the shipped recipe's) it has a ``Linear(width, 6·width)`` per
  block, on a per-sample vector: the extra work is B·width·6·width per block, not per
  token, but the extra weights (10M at DiT-S) cost the optimiser a full update each step.
* ``out_channels=in_channels``: no learned-sigma channels (PixArt's default 8 would
  predict twice the output for a variance unizoo does not train).
* ``use_additional_conditions=False``: no resolution / aspect-ratio embeddings
  (PixArt turns them on only for its 1024 px model).
* Cross-attention: PixArt applies no norm before it; unizoo has an affine LayerNorm.
  unizoo also adds the mean-pooled condition to the adaLN vector (an MLP on B vectors).

The harness counts both models' FLOPs with the same counter and reports both, so
the difference these choices make is a number in the table, not a claim.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from unizoo.components.backbones.causal_lm import LM_SIZES

from .peer_models import ADALN_NAMES, recipe_default_note

# The default recipe's backbone (recipes/backbone/qwen2.yaml: size tiny) produces the
# generator's condition tokens at this width; tests check the two agree.
DEFAULT_BACKBONE_SIZE = "tiny"
DEFAULT_CONDITION_DIM = LM_SIZES[DEFAULT_BACKBONE_SIZE]["hidden_size"]

def architecture_note(adaln: str) -> str:
    """How the two models differ, for unizoo's DiT built with modulation ``adaln``."""
    modulation = ("both modulate with " + ADALN_NAMES["single"] if adaln == "single" else
                  f"PixArt modulates with {ADALN_NAMES['single']}, unizoo with {ADALN_NAMES[adaln]}")
    return (
        "Not the same model, the same work: both are DiT blocks (self-attention, cross-attention to the Q "
        f"condition tokens, MLP) at the same depth, width, heads, patch and Q, and {modulation}. PixArt projects "
        "the condition with a two-layer caption MLP (unizoo: LayerNorm + one Linear, and the mean-pooled "
        "condition added to the timestep vector) and puts no norm before cross-attention (unizoo: an affine "
        "LayerNorm). out_channels = in_channels (no learned sigma), no additional size conditions."
        + recipe_default_note(adaln)
    )


def build_pixart(cfg) -> nn.Module:
    """``PixArtTransformer2DModel`` at ``cfg``'s size (a :class:`benchmarks.peer_models.PeerConfig`)."""
    from diffusers import PixArtTransformer2DModel  # noqa: PLC0415 - heavy import, peer only

    return PixArtTransformer2DModel(
        num_attention_heads=cfg.heads,
        attention_head_dim=cfg.hidden // cfg.heads,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        num_layers=cfg.depth,
        cross_attention_dim=cfg.hidden,  # the caption projection maps D to the width first
        caption_channels=cfg.cond_dim,
        sample_size=cfg.latent_size,
        patch_size=cfg.patch,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    )


def pixart_loss(model: nn.Module, batch) -> torch.Tensor:
    # PixArt embeds a DDPM step on the 0..999 scale, as diffusers' DiT: the same t.
    timestep = (batch.t * 1000).long().clamp(max=999)
    prediction = model(batch.x_t, encoder_hidden_states=batch.cond, timestep=timestep).sample
    return nn.functional.mse_loss(prediction.float(), batch.target)
