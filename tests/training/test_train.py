"""`unizoo train` end to end at tiny size, then `unizoo sample` from the run it wrote."""

from __future__ import annotations

import json
import logging

import pytest
from PIL import Image

from conftest import STAGE_STEPS, TINY_OVERRIDES
from unizoo.cli import main
from unizoo.config.composition import compose_recipe
from unizoo.training.runs import load_run
from unizoo.training.train import train


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    overrides = [*TINY_OVERRIDES, *STAGE_STEPS["generation"], f"run_root={tmp_path_factory.mktemp('runs')}"]
    logger = logging.getLogger("unizoo")
    level = logger.level
    logger.setLevel(logging.INFO)  # as the CLI does, so train.log holds the evaluation lines
    try:
        return train(compose_recipe("default", overrides))
    finally:
        logger.setLevel(level)


def test_run_directory_holds_everything(tiny_run):
    for name in ["recipe.yaml", "tokenizer/tokenizer.json", "checkpoints/generation.ckpt", "samples_untrained.png",
                 "samples_generation.png", "metrics.json", "train.log", "logs/generation/metrics.csv", "round_trip.png"]:
        assert (tiny_run / name).exists(), name
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    for phase in ("untrained", "generation"):
        assert 0.0 <= metrics[phase]["generation"]["overall"] <= 1.0
        assert 0.0 <= metrics[phase]["generation"]["strict_overall"] <= 1.0
        assert metrics[phase]["generation"]["n"] == 4
        assert "understanding" not in metrics[phase]  # the default backbone has no vision encoder
    assert metrics["seconds_total"] > 0
    # Chance levels of this run's data: all 64 val images, each against 5 other images' prompts.
    chance = metrics["chance"]
    assert chance["n"] == 64 * 5 and 0.0 <= chance["strict_overall"] <= chance["overall"] < 0.5
    assert {"single_object", "counting", "position", "strict_single", "strict_relation"} <= set(chance)
    logged = [line for line in (tiny_run / "train.log").read_text().splitlines() if "evaluation on 4 prompts" in line]
    # untrained, then after the stage once with the trained weights and once with their EMA
    assert len(logged) == 3 and all("strict_overall" in line and "(chance " in line for line in logged), logged
    round_trip = metrics["representation"]
    assert 0.0 <= round_trip["round_trip"] <= 1.0 and round_trip["original"] == 1.0  # real images score perfectly
    assert 0.0 <= round_trip["random_features"] <= 1.0  # the floor: random tokens of the real ones' statistics
    assert Image.open(tiny_run / "samples_generation.png").size[0] > 100


def test_loaded_run_reproduces_its_samples(tiny_run):
    _, model = load_run(tiny_run)
    first = model.generate(["a red circle", "two blue squares"], steps=3, guidance=2.0, seed=7)
    again = model.generate(["a red circle", "two blue squares"], steps=3, guidance=2.0, seed=7)
    assert first.shape == (2, 3, 32, 32)
    assert (first == again).all()
    assert first.min() >= -1 and first.max() <= 1


def test_sample_command_writes_pngs(tiny_run, tmp_path, capsys):
    out = tmp_path / "samples"
    assert main(["sample", str(tiny_run), "--prompt", "a red circle above a blue square", "--n", "3", "--steps", "2", "--out", str(out)]) == 0
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["000.png", "001.png", "002.png", "grid.png"]
    assert Image.open(pngs[0]).size == (32, 32)


def test_second_run_reuses_the_cached_vae(tiny_run, tiny_overrides, caplog):
    # tiny_run trained and cached the VAE for exactly these data + VAE settings.
    with caplog.at_level(logging.INFO, logger="unizoo"):
        second = train(compose_recipe("default", [*tiny_overrides, "strategy.steps=1"]))
    assert "reusing the cached VAE" in caplog.text
    # Each run logs into its own train.log only.
    assert str(second) in (second / "train.log").read_text()
    assert str(second) not in (tiny_run / "train.log").read_text()
