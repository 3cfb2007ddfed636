"""bf16: `trainer.precision=bf16-mixed` trains end to end on the CPU (autocast changes the numbers, not the
outcome), the recipes choose it where the hardware computes it natively, and the VAE pretrains in it."""

from __future__ import annotations

import csv
import itertools
import logging
import math

import pytest
import torch
from diffusers import AutoencoderKL
from torch.utils.data import DataLoader

from conftest import STAGE_STEPS
from unizoo.config.composition import compose_recipe
from unizoo.pretraining.autoencoder import train_autoencoder
from unizoo.pretraining.batches import endless_images
from unizoo.runtime import precision
from unizoo.runtime.precision import describe_precision
from unizoo.training.train import train


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


@pytest.mark.parametrize("native", [True, False])
def test_recipes_choose_bf16_where_the_hardware_computes_it(monkeypatch, native):
    monkeypatch.setattr(precision, "computes_bf16_natively", lambda accelerator: native)
    recipe = compose_recipe("default", [])
    expected = "bf16-mixed" if native else "32-true"
    assert recipe.trainer.precision == expected
    assert describe_precision(recipe.trainer).startswith(f"precision {expected}, because this cpu ")
    # Set by hand, it is kept and said so.
    chosen = compose_recipe("default", ["trainer.precision=bf16-mixed"]).trainer
    assert describe_precision(chosen) == "precision bf16-mixed, as the recipe sets it"


def test_the_choice_follows_the_cpus_instructions(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert precision.bf16_if_native("cpu") == "32-true"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert precision.bf16_if_native("cpu") == "bf16-mixed"
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # a torch without the private helper: no
    assert precision.bf16_if_native("cpu") == "32-true"


def test_vae_pretraining_in_bf16_steps_of_its_own_batch_size(caplog):
    images = torch.rand(40, 3, 16, 16) * 2 - 1
    loader = DataLoader([{"image": image} for image in images], batch_size=8)
    assert [len(x) for x in itertools.islice(endless_images(loader, 3), 5)] == [3, 3, 2, 3, 3]  # within each batch of 8
    config = dict(block_out_channels=[16, 16], latent_channels=4, layers_per_block=1, norm_num_groups=8,
                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    trained = {}
    for mode in ("32-true", "bf16-mixed"):
        torch.manual_seed(0)
        vae = AutoencoderKL(**config)
        with caplog.at_level(logging.INFO, logger="unizoo.pretraining.autoencoder"):
            losses = train_autoencoder(vae, loader, steps=6, lr=1e-3, batch_size=4, precision=mode)
        assert math.isfinite(losses["reconstruction"])
        assert f"VAE pretrained for 6 steps of 4 images ({mode})" in caplog.text
        assert all(p.dtype == torch.float32 for p in vae.parameters())  # autocast, fp32 master weights
        trained[mode] = torch.cat([p.detach().flatten() for p in vae.parameters()])
    difference = (trained["32-true"] - trained["bf16-mixed"]).abs().max().item()
    assert 0 < difference < 0.05  # bf16 moved the numbers, not the direction of training
