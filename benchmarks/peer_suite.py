"""The conditioned comparisons built on ``run_peer``: PixArt at Q condition tokens, and the scaling points.

* ``run_pixart``: unizoo's DiT reading Q condition tokens (Q = 16 and 64, width of the
  default backbone) against PixArt at the same size, every switch on both sides.
* ``run_scaling``: the same pair at Q = 16 as target tokens grow (64, 256, 1024) and as
  the DiT grows (S, B); each point runs each family's fp32 row and its all-switches row.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from unizoo.components.generators.dit import DIT_SIZES

from .peer_dit import run_peer, switch_variants, variants_for
from .peer_models import PeerConfig
from .peer_pixart import DEFAULT_CONDITION_DIM
from .row_guard import RowLimits

PEER = "pixart"
SWITCH_SUFFIXES = {"fp32": "fp32", "bf16": "bf16", "compile": "compile", "fused-adamw": "fused-adamw",
                   "all": "bf16+compile+fused"}


def conditioned(cfg: PeerConfig, condition_tokens: int) -> PeerConfig:
    return replace(cfg, condition_tokens=condition_tokens, condition_dim=cfg.condition_dim or DEFAULT_CONDITION_DIM)


def run_pixart(cfg: PeerConfig, device: torch.device, peaks: dict, condition_tokens=(16, 64), progress=print,
               limits: RowLimits = RowLimits()) -> dict:
    sections = []
    for q in condition_tokens:
        progress(f"peer pixart: {q} condition tokens")
        sections.append(run_peer(conditioned(cfg, q), device, peaks, variants_for(PEER), progress, limits))
    return {"sections": sections}


@dataclass(frozen=True)
class ScalingConfig:
    tokens: tuple[int, ...] = (64, 256, 1024)  # target tokens per image: latent (sqrt(N)·patch)^2
    sizes: tuple[str, ...] = ("S", "B")  # DIT_SIZES presets
    condition_tokens: int = 16
    switches: tuple[str, ...] = ("fp32", "all")  # of SWITCH_SUFFIXES, for both families
    warmup: int = 2
    repeats: int = 5
    # Quick mode: one-block stand-ins for the presets, so the harness runs in seconds.
    size_overrides: tuple[tuple[str, int, int, int], ...] = ()  # (size, depth, hidden, heads)

    @classmethod
    def quick(cls) -> ScalingConfig:
        return cls(tokens=(4, 16), switches=("fp32", "bf16"), warmup=1, repeats=2,
                   size_overrides=(("S", 1, 32, 2), ("B", 1, 64, 4)))


def point_config(base: PeerConfig, scaling: ScalingConfig, size: str, tokens: int) -> PeerConfig:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"target tokens must be a square number (a latent grid), got {tokens}")
    dims = {name: dict(depth=d, hidden=h, heads=a) for name, d, h, a in scaling.size_overrides}.get(size)
    if dims is None:
        preset = DIT_SIZES[size]
        dims = dict(depth=preset["depth"], hidden=preset["hidden_size"], heads=preset["num_heads"])
    steps = scaling.warmup + scaling.repeats
    cfg = replace(base, latent_size=side * base.patch, warmup=scaling.warmup, repeats=scaling.repeats,
                  loss_steps=steps, **dims)
    return conditioned(cfg, scaling.condition_tokens)


def run_scaling(base: PeerConfig, scaling: ScalingConfig, device: torch.device, peaks: dict, progress=print,
                limits: RowLimits = RowLimits()) -> dict:
    wanted = {SWITCH_SUFFIXES[s] for s in scaling.switches}
    variants = tuple(v for family in (PEER, "unizoo") for v in switch_variants(family)
                     if v.name.split(" ", 1)[1] in wanted)
    points = []
    for size in scaling.sizes:
        for tokens in scaling.tokens:
            cfg = point_config(base, scaling, size, tokens)
            progress(f"peer scaling: size {size}, {tokens} target tokens ({cfg.label})")
            points.append({"size": size, "tokens": tokens,
                           "section": run_peer(cfg, device, peaks, variants, progress, limits)})
    config = {**asdict(scaling), "peer": PEER, "batch": base.batch,
              "condition_dim": base.condition_dim or DEFAULT_CONDITION_DIM,
              "switches": [SWITCH_SUFFIXES[s] for s in scaling.switches]}
    return {"config": config, "points": points}
