"""`trainer.precision=bf16-mixed` trains end to end on the CPU: autocast changes the numbers, not the outcome."""

from __future__ import annotations

import csv
import math

import torch

from conftest import STAGE_STEPS
from unizoo.composition import compose_recipe
from unizoo.train import train


def losses(run_dir, stage="generation", column="train/generation"):
    with open(run_dir / "logs" / stage / "metrics.csv") as file:
        return [float(row[column]) for row in csv.DictReader(file) if row.get(column)]


def test_bf16_mixed_trains_like_fp32(tiny_overrides):
    runs = {
        precision: train(compose_recipe("default", [*tiny_overrides, *STAGE_STEPS["generation"], f"trainer.precision={precision}"]))
        for precision in ("32-true", "bf16-mixed")
    }
    fp32, bf16 = losses(runs["32-true"]), losses(runs["bf16-mixed"])
    assert len(fp32) == len(bf16) == 4 and all(map(math.isfinite, bf16))
    # Autocast ran the matmuls in bfloat16 (~3 significant digits): the same step's loss moves, but little.
    assert fp32[0] != bf16[0]
    assert abs(fp32[0] - bf16[0]) < 0.05 * fp32[0]
    state = torch.load(runs["bf16-mixed"] / "checkpoints" / "generation.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    generator = {k: v for k, v in state.items() if k.startswith("generator.")}
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in generator.values())  # fp32 master weights
