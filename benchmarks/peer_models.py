"""The two DiTs of the peer benchmark, built at the same size, and their shared data.

Default: DiT-S/2 on 32x32x4 latents (depth 12, width 384, 6 heads, patch 2 -> 256
tokens), batch 8.

The models are not identical, and tables say so:

* diffusers' ``DiTTransformer2DModel`` is class-conditional: it takes ``(B, 4, H, W)``
  latents, an integer ``timestep`` and ``class_labels`` (a 1000-way embedding added
  to the timestep embedding for adaLN-Zero); it patchifies itself (a conv). In
  training mode it replaces 10% of the labels by its "null" class at random (its
  built-in classifier-free-guidance dropout), so each run is seeded the same.
* unizoo's DiT takes patchified tokens ``(B, 256, 16)`` (4·2·2 channels per token), a
  float time in [0, 1] and a condition *sequence* ``(B, Q, D)``, here one token
  ``(B, 1, 384)`` looked up from a fixed random table by the same class label, so
  both models see "the class". Every unizoo block also cross-attends to that
  condition, so it does more work per step than diffusers' DiT at the same width.

Both predict 4 channels per pixel (diffusers' ``out_channels=4``, i.e. no learned
sigma) and train on the same flow-matching MSE: ``x_t = (1 - t)·x0 + t·noise``,
target ``noise - x0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from unizoo.components.generators.dit import dit
from unizoo.config.composition import recipes_dir


def recipe_adaln() -> str:
    """The modulation the shipped generator recipe builds (recipes/generator/dit.yaml)."""
    return OmegaConf.load(recipes_dir() / "generator" / "dit.yaml").get("adaln", "zero")


# How each of unizoo's modulations (DiT's ``adaln``) is named in the tables.
ADALN_NAMES = {
    "zero": "adaLN-Zero (a Linear(width, 6 width) per block)",
    "single": "adaLN-single (one shared Linear(width, 6 width) and a learned (6, width) table per block)",
}


def recipe_default_note(adaln: str) -> str:
    """A sentence for a table whose unizoo side is not built as the shipped recipe builds its DiT."""
    default = recipe_adaln()
    if adaln == default:
        return ""
    return (f" The shipped recipe (recipes/generator/dit.yaml) builds adaln={default} instead, "
            f"{ADALN_NAMES[default]}; `--adaln {default}` times that.")


@dataclass
class PeerConfig:
    latent_size: int = 32
    latent_channels: int = 4
    patch: int = 2
    depth: int = 12
    hidden: int = 384
    heads: int = 6
    batch: int = 8
    num_classes: int = 1000
    condition_tokens: int = 1  # Q; 1 = the class token of the DiT comparison, >1 = the PixArt comparison
    condition_dim: int | None = None  # D of the condition tokens; None = hidden (the class table's width)
    lr: float = 1e-4
    # unizoo's modulation, "zero" | "single" (DiT's adaln); None = the peer's own (peer_dit.PEER_ADALN),
    # which run_peer fills in: the "same architecture where the architectures allow it".
    adaln: str | None = None
    attention: str = "auto"  # unizoo's backend, as a recipe's default: sdpa in fp32 (the kernel diffusers'
                             # AttnProcessor2_0 uses), gemm under bf16 on the CPU (attention.auto_backend)
    warmup: int = 3
    repeats: int = 10
    loss_steps: int = 20
    compile_backend: str = "inductor"
    seed: int = 0
    max_profiles: int | None = None  # "why" profiles per comparison, slowest pair first; None = every slower pair
    emulated_bf16: bool = False  # run bf16 rows on a CPU without bf16 instructions too (skipped by default)

    @classmethod
    def quick(cls) -> PeerConfig:
        return cls(latent_size=8, depth=1, hidden=32, heads=2, batch=2, warmup=1, repeats=2,
                   loss_steps=4, compile_backend="aot_eager", max_profiles=1)

    @property
    def num_tokens(self) -> int:
        return (self.latent_size // self.patch) ** 2

    @property
    def token_dim(self) -> int:
        return self.latent_channels * self.patch**2

    @property
    def cond_dim(self) -> int:
        return self.condition_dim or self.hidden

    @property
    def label(self) -> str:
        condition = "" if self.condition_tokens == 1 else f", {self.condition_tokens} condition tokens of width {self.cond_dim}"
        return (f"depth {self.depth}, width {self.hidden}, {self.heads} heads, patch {self.patch}, "
                f"{self.latent_size}x{self.latent_size}x{self.latent_channels} latents "
                f"({self.num_tokens} tokens){condition}, batch {self.batch}")


def build_unizoo(cfg: PeerConfig, gradient_checkpointing: bool = False, attention: str | None = None) -> nn.Module:
    return dit(
        "S",
        token_dim=cfg.token_dim,
        num_tokens=cfg.num_tokens,
        condition_dim=cfg.cond_dim,
        depth=cfg.depth,
        hidden_size=cfg.hidden,
        num_heads=cfg.heads,
        attention_backend=attention or cfg.attention,
        gradient_checkpointing=gradient_checkpointing,
        # run_peer fills in the peer's own modulation; a model built outside a comparison has no
        # peer to match, so it is the shipped recipe's.
        adaln=cfg.adaln or recipe_adaln(),
    )


def build_diffusers(cfg: PeerConfig) -> nn.Module:
    from diffusers import DiTTransformer2DModel  # noqa: PLC0415 - heavy import, peer only

    return DiTTransformer2DModel(
        num_attention_heads=cfg.heads,
        attention_head_dim=cfg.hidden // cfg.heads,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        num_layers=cfg.depth,
        sample_size=cfg.latent_size,
        patch_size=cfg.patch,
        num_embeds_ada_norm=cfg.num_classes,
    )


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, (H/p)(W/p), C·p·p)``, row-major over patches."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // patch) * (W // patch), C * patch * patch)


@dataclass
class Batch:
    """One training batch in both models' input formats (same numbers)."""

    x_t: torch.Tensor  # (B, C, H, W) noisy latents
    target: torch.Tensor  # (B, C, H, W) velocity noise - x0
    t: torch.Tensor  # (B,) float in [0, 1)
    labels: torch.Tensor  # (B,) int class labels
    cond: torch.Tensor  # (B, Q, D): the label's token (Q = 1, D = hidden) or Q random condition tokens
    tokens: torch.Tensor  # patchified x_t
    token_target: torch.Tensor  # patchified target

    def to(self, device: torch.device) -> Batch:
        return Batch(**{name: value.to(device) for name, value in vars(self).items()})


def make_batches(cfg: PeerConfig, count: int, device: torch.device) -> list[Batch]:
    """``count`` distinct batches, the same for every variant (seeded on the CPU)."""
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    class_table = torch.randn(cfg.num_classes, cfg.hidden, generator=generator)
    shape = (cfg.batch, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    batches = []
    for _ in range(count):
        x0 = torch.randn(shape, generator=generator)
        noise = torch.randn(shape, generator=generator)
        t = torch.rand(cfg.batch, generator=generator)
        labels = torch.randint(0, cfg.num_classes, (cfg.batch,), generator=generator)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        target = noise - x0
        if cfg.condition_tokens == 1 and cfg.condition_dim is None:
            cond = class_table[labels].unsqueeze(1)
        else:
            cond = torch.randn(cfg.batch, cfg.condition_tokens, cfg.cond_dim, generator=generator)
        batches.append(
            Batch(x_t, target, t, labels, cond,
                  patchify(x_t, cfg.patch), patchify(target, cfg.patch)).to(device)
        )
    return batches


def unizoo_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    prediction = model(batch.tokens, batch.t, batch.cond)
    return nn.functional.mse_loss(prediction.float(), batch.token_target)


def diffusers_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    # diffusers' DiT embeds an integer DDPM step; the same t on its 0..999 scale.
    timestep = (batch.t * 1000).long().clamp(max=999)
    prediction = model(batch.x_t, timestep=timestep, class_labels=batch.labels).sample
    return nn.functional.mse_loss(prediction.float(), batch.target)


@torch.no_grad()
def wake_zero_init(model: nn.Module) -> list[str]:
    """Re-draw every all-zero weight matrix (xavier uniform, as DiT's other linears); return names.

    DiT's adaLN-Zero init makes a new model output exactly 0, in any precision, with
    its blocks switched off, so the loss is var(target) whatever the precision did to
    the blocks and a 20-step loss comparison would pass vacuously. The peer benchmark
    starts every variant from this "awake" copy instead: every block shapes the output
    from step 1. Weight values do not change the work, so timings are unaffected.
    """
    woken = []
    for name, parameter in model.named_parameters():
        if parameter.ndim >= 2 and not parameter.any():
            nn.init.xavier_uniform_(parameter)
            woken.append(name)
    return woken


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
