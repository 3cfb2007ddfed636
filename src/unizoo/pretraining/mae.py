"""Pretrain a tiny masked autoencoder (MAE, He et al., arXiv 2111.06377) on the recipe's images, without captions.

A ViT encoder sees a random quarter of an image's patches; a lighter decoder fills in
the rest from the encoder's tokens and a learned mask token, and the loss is the error
of the missing patches' pixels (raw by default here; MAE's `norm_pix_loss` normalises each
patch by its own mean and variance, which on the shapes data's flat colours would hide the
colour the evaluator scores: recipes/ssl/tiny.yaml). The encoder's patch features of the whole image are then the
`ssl` representation (`components/representations/ssl.py`): features learned from
images alone, against CLIP's language-supervised ones and the VAE's reconstructions.

Why MAE and not DINO here: MAE needs no augmentations, where DINO's self-distillation
learns to be invariant to them, and the augmentations DINO relies on (colour jitter,
crops) would remove exactly what the shapes evaluator scores (colours, positions,
counts). MAE also has no collapse to prevent (no teacher momentum, centring or
temperatures to tune for a model of 0.3M parameters trained for a minute on 2 cores),
and one forward and backward per step.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Literal, TypedDict

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from unizoo.pretraining.batches import endless_images
from unizoo.runtime.fabric import describe, loop_fabric
from unizoo.runtime.progress import LoopProgress
from unizoo.runtime.schedules import warmup_cosine

log = logging.getLogger(__name__)


class MAEArchitecture(TypedDict, total=False):
    """The tiny MAE's sizes (recipes/ssl/): the encoder's, then the decoder's."""

    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_ratio: float
    decoder_hidden_size: int
    decoder_layers: int
    decoder_heads: int


# The embedded default: patch 4 on 32 px -> an 8x8 grid of 64 tokens of width 64, the tiny CLIP
# tower's grid, width and depth, so `ssl` and `clip` targets have the same shape.
TINY_MAE: MAEArchitecture = dict(
    patch_size=4, hidden_size=64, num_layers=3, num_heads=4, mlp_ratio=4.0,
    decoder_hidden_size=64, decoder_layers=2, decoder_heads=4,
)


def sincos_2d(side: int, width: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine positions `(side², width)` of a row-major square grid (MAE's)."""
    if width % 4:
        raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {width}")
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    parts = []
    for axis in (rows.flatten(), cols.flatten()):
        angles = axis.to(torch.float64)[:, None] * omega[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


def patchify_images(images: torch.Tensor, patch: int) -> torch.Tensor:
    """`(B, 3, H, W) -> (B, (H/p)(W/p), p p 3)`, row-major over patches."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def _blocks(width: int, heads: int, mlp_ratio: float, depth: int) -> nn.ModuleList:
    # Pre-norm ViT blocks (norm_first), GELU MLP, no dropout.
    return nn.ModuleList(
        nn.TransformerEncoderLayer(width, heads, int(width * mlp_ratio), dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        for _ in range(depth)
    )


class MAEEncoder(nn.Module):
    """The ViT encoder: `(B, 3, H, W)` in [-1, 1] -> patch features `(B, N, C)` (after its final LayerNorm)."""

    def __init__(self, image_size: int, patch_size: int, hidden_size: int, num_layers: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"ssl.architecture.patch_size={patch_size} must divide the image size {image_size}")
        self.patch_size, self.grid = patch_size, image_size // patch_size
        self.hidden_size = hidden_size
        self.patch_embed = nn.Linear(3 * patch_size * patch_size, hidden_size)
        self.register_buffer("positions", sincos_2d(self.grid, hidden_size), persistent=False)
        self.blocks = _blocks(hidden_size, num_heads, mlp_ratio, num_layers)
        self.norm = nn.LayerNorm(hidden_size)

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    def forward(self, images: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Features of every patch, or of the patches `keep (B, K)` indexes (in that order): `(B, K, C)`."""
        tokens = self.patch_embed(patchify_images(images, self.patch_size)) + self.positions
        if keep is not None:
            tokens = torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)


class TinyMAE(nn.Module):
    """Encoder + decoder; `loss(images)` is MAE's masked-patch reconstruction loss."""

    def __init__(self, image_size: int = 32, architecture: MAEArchitecture | None = None) -> None:
        super().__init__()
        unknown = set(architecture or {}) - set(TINY_MAE)
        if unknown:
            raise ValueError(f"unknown ssl.architecture keys {sorted(unknown)}; expected some of {sorted(TINY_MAE)}")
        a = {**TINY_MAE, **(architecture or {})}
        self.encoder = MAEEncoder(image_size, a["patch_size"], a["hidden_size"], a["num_layers"], a["num_heads"], a["mlp_ratio"])
        width = a["decoder_hidden_size"]
        self.decoder_embed = nn.Linear(a["hidden_size"], width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("decoder_positions", sincos_2d(self.encoder.grid, width), persistent=False)
        self.decoder_blocks = _blocks(width, a["decoder_heads"], a["mlp_ratio"], a["decoder_layers"])
        self.decoder_norm = nn.LayerNorm(width)
        self.decoder_pred = nn.Linear(width, 3 * a["patch_size"] ** 2)
        nn.init.normal_(self.mask_token, std=0.02)

    def loss(self, images: torch.Tensor, mask_ratio: float = 0.75, norm_pix_loss: bool = False) -> torch.Tensor:
        """Mean squared error of the masked patches' pixels, reconstructed from the visible ones; images `(B, 3, H, W)`."""
        b, n = images.shape[0], self.encoder.num_patches
        visible = max(1, round(n * (1 - mask_ratio)))
        order = torch.rand(b, n, device=images.device).argsort(dim=1)  # a random permutation per image
        keep, masked = order[:, :visible], order[:, visible:]
        encoded = self.decoder_embed(self.encoder(images, keep))
        # The decoder's sequence: the encoded tokens at their patches, the mask token everywhere else.
        tokens = self.mask_token.to(encoded.dtype).expand(b, n, -1).clone()
        tokens = tokens.scatter(1, keep.unsqueeze(-1).expand_as(encoded), encoded) + self.decoder_positions
        for block in self.decoder_blocks:
            tokens = block(tokens)
        prediction = self.decoder_pred(self.decoder_norm(tokens)).float()
        target = patchify_images(images.float(), self.encoder.patch_size)
        if norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        index = masked.unsqueeze(-1).expand(-1, -1, target.shape[-1])
        return F.mse_loss(torch.gather(prediction, 1, index), torch.gather(target, 1, index))


def train_mae(
    model: TinyMAE,
    loader: DataLoader,
    steps: int,
    lr: float = 1.5e-3,
    weight_decay: float = 0.05,
    warmup_steps: int = 50,
    mask_ratio: float = 0.75,
    norm_pix_loss: bool = False,
    batch_size: int | None = None,
    precision: Literal["32-true", "bf16-mixed", "auto"] = "32-true",
    seed: int = 0,
) -> dict[str, float]:
    """Train `model` in place for `steps` batches of `loader`'s images (captions unused), on the run's device.

    `batch_size` splits the loader's batches into steps of that many images (None: one step per
    batch). AdamW with betas (0.9, 0.95), MAE's. The weights are back on the CPU when it returns.
    """
    if not 0 < mask_ratio < 1:
        raise ValueError(f"ssl.pretraining.mask_ratio={mask_ratio}: expected a fraction of the patches in (0, 1), e.g. 0.75")
    torch.manual_seed(seed)
    fabric = loop_fabric(precision)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    model, optimizer = fabric.setup(model, optimizer)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(min(warmup_steps, steps // 2 + 1), steps, 0.02))
    batches = endless_images(loader, batch_size)
    start = time.perf_counter()
    progress = LoopProgress(f"pretraining MAE ({describe(fabric)})", steps)
    loss = torch.tensor(math.nan)
    for _ in range(steps):
        images = fabric.to_device(next(batches))
        with fabric.autocast():
            loss = model.loss(images, mask_ratio, norm_pix_loss)
        optimizer.zero_grad(set_to_none=True)
        fabric.backward(loss)
        optimizer.step()
        schedule.step()
        progress.step(lambda: {"loss": loss.item()})
    final = {"loss": loss.item()}
    progress.close(final)
    model.module.to("cpu").eval()
    seconds = time.perf_counter() - start
    log.info("MAE pretrained for %d steps (%s) in %.0f s (masked-patch loss %.4f)", steps, describe(fabric), seconds, final["loss"])
    return {**final, "seconds": seconds}
