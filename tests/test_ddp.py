"""Data-parallel training for real: two CPU processes over gloo (`trainer=ddp_cpu`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import STAGE_STEPS, TINY_OVERRIDES


def state(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("ddp_runs")
    overrides = [*TINY_OVERRIDES, "strategy=sequential", *STAGE_STEPS["sequential"], "trainer=ddp_cpu", f"run_root={runs}"]
    process = subprocess.run([sys.executable, "-m", "unizoo.cli", "train", *overrides],
                             capture_output=True, text=True, timeout=600, check=False)
    assert process.returncode == 0, process.stderr[-4000:]
    (run_dir,) = (runs / "default").iterdir()
    return run_dir, process.stderr


def test_two_processes_join_one_gloo_group(ddp_run):
    _, stderr = ddp_run
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in stderr and "GLOBAL_RANK: 1, MEMBER: 2/2" in stderr
    assert "distributed_backend=gloo" in stderr


def test_trained_weights_come_back_to_the_launching_process(ddp_run):
    # Each stage's checkpoint is written by the launching process after fit(); rank 0's
    # last periodic checkpoint is written inside the workers. Equal means the trained
    # weights came back, so the evaluation after the stage scored the trained model.
    run_dir, _ = ddp_run
    for stage in ("understanding", "generation"):
        assert same(state(run_dir / "checkpoints" / f"{stage}.ckpt"), state(run_dir / "checkpoints" / stage / "last.ckpt"))
    understanding, generation = (state(run_dir / "checkpoints" / f"{s}.ckpt") for s in ("understanding", "generation"))
    assert not torch.equal(understanding["backbone.queries"], generation["backbone.queries"])
    # The frozen backbone stays bit-identical across the workers' stage 2, as in one process.
    lm = {k: v for k, v in understanding.items() if k.startswith("backbone.lm.")}
    assert lm and all(torch.equal(v, generation[k]) for k, v in lm.items())


def test_metrics_and_losses_of_every_stage(ddp_run):
    run_dir, _ = ddp_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"untrained", "understanding", "generation"} <= metrics.keys()
    for stage, column in (("understanding", "train/understanding"), ("generation", "train/generation")):
        lines = (run_dir / "logs" / stage / "metrics.csv").read_text().splitlines()
        index = lines[0].split(",").index(column)
        losses = [float(cells[index]) for cells in (line.split(",") for line in lines[1:]) if cells[index]]
        assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
