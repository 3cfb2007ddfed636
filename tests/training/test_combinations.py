"""All 8 corners of the study train end to end: representation x objective x strategy.

Each trains at tiny size for a few dozen steps from the command line's own entry
point; every loss it logs must be finite and fall.
"""

from __future__ import annotations

import csv
import itertools
import math

import pytest
from PIL import Image

from conftest import TINY_OVERRIDES
from unizoo.cli import main

# Scalar CLIP normalisation here, not the recipe's per-channel one: it leaves the channels'
# means in the target, which a few dozen steps learn, so the loss falls visibly. Per channel,
# the target's only content is image-specific, which a 3-step CLIP and 24 steps on half-batches
# of 4 do not learn (the loss stays at its zero-prediction value of 1.0 +- noise). This test
# checks that every corner trains; per-channel normalisation is tested in
# tests/components/test_clip_representation.py and measured in benchmarks/clip_fidelity.py.
TARGET_NORMALISATION = {"clip": ["representation.normalize=scalar"], "vae": []}
STEPS = {"joint": ["strategy.steps=24"], "sequential": ["strategy.understanding_steps=24", "strategy.generation_steps=24"]}
COMBINATIONS = list(itertools.product(["vae", "clip"], ["mse", "flow_matching"], ["joint", "sequential"]))


def logged_losses(run_dir):
    """{loss name: [values in step order]} over every stage's CSV log."""
    losses = {}
    for path in sorted((run_dir / "logs").glob("*/metrics.csv")):
        for row in csv.DictReader(path.open()):
            for key, value in row.items():
                if key.startswith("train/") and key != "train/loss" and value:
                    losses.setdefault(f"{path.parent.name}:{key}", []).append(float(value))
    return losses


@pytest.mark.parametrize(("representation", "objective", "strategy"), COMBINATIONS)
def test_combination_trains_and_its_losses_fall(representation, objective, strategy, tmp_path, capsys):
    overrides = [f"representation={representation}", f"objective={objective}", f"strategy={strategy}", *TINY_OVERRIDES,
                 *STEPS[strategy], *TARGET_NORMALISATION[representation], "optimizer.lr=3e-3", "warmup_steps=2", f"run_root={tmp_path}"]
    assert main(["train", *overrides]) == 0
    run_dir = next(tmp_path.glob("default/*"))
    losses = logged_losses(run_dir)
    expected = {"joint": {"joint:train/generation", "joint:train/understanding"},
                "sequential": {"understanding:train/understanding", "generation:train/generation"}}[strategy]
    assert set(losses) == expected
    for name, values in losses.items():
        assert all(math.isfinite(v) for v in values), name
        first, last = sum(values[:6]) / 6, sum(values[-6:]) / 6
        assert last < first, f"{name}: {first:.4f} -> {last:.4f}"
    # Sampling writes images, not features, whatever the representation.
    out = tmp_path / "samples"
    assert main(["sample", str(run_dir), "--prompt", "a red circle", "--n", "2", "--steps", "2", "--out", str(out)]) == 0
    with Image.open(out / "000.png") as image:
        assert image.size == (32, 32) and image.mode == "RGB"
