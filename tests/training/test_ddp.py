"""Data-parallel and fully sharded training for real: two CPU processes over gloo (`trainer=ddp_cpu`, `trainer=fsdp`)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from conftest import STAGE_STEPS, TINY_OVERRIDES
from unizoo.config.composition import compose_recipe
from unizoo.training.build import build_model
from unizoo.training.train import train


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


EQUALITY = [*TINY_OVERRIDES, "objective=mse", "strategy.steps=4", "warmup_steps=1"]


@pytest.fixture(scope="module")
def one_process_at_batch_16(tmp_path_factory):
    """The reference: one process at batch 16, from a pretrained VAE saved for the 2-process runs to load too
    (the tiny VAE unizoo pretrains depends on the batch size it saw)."""
    root = tmp_path_factory.mktemp("equality")
    recipe = compose_recipe("default", EQUALITY)
    model = build_model(recipe)
    model.representation.prepare(instantiate(recipe.data))
    model.representation.vae.save_pretrained(root / "vae")
    shared = [*EQUALITY, f"representation.pretrained={root / 'vae'}"]
    run_dir = train(compose_recipe("default", [*shared, "data.batch_size=16", f"run_root={root / 'one'}"]))
    L.seed_everything(0, verbose=False)  # as train() does before building: the weights the runs started from
    start = build_model(compose_recipe("default", shared)).state_dict()
    return shared, state(run_dir / "checkpoints" / "generation.ckpt"), start


@pytest.mark.parametrize("trainer", ["ddp_cpu", "fsdp"])
def test_two_processes_end_with_the_weights_of_one_at_the_same_global_batch(trainer, one_process_at_batch_16, tmp_path):
    """2 processes at batch 8 end with the weights of 1 process at batch 16, to 1e-5, after 4 AdamW steps.

    ddp_cpu replicates the model and all-reduces gradients; fsdp (FSDP2 under Lightning's
    ModelParallelStrategy) shards parameters, gradients and optimiser states over the two
    processes and reduce-scatters. Both see the same 16 samples per step (the sampler gives
    rank r positions r, r+2, ... of one order) and average the two batch-mean gradients into
    the batch-16 mean. That is exact only for a loss that is a per-sample mean with no random
    draw: the MSE objective. (Flow matching draws its noise per rank, so two processes see
    other noise than one; the understanding loss averages over tokens, whose count differs
    per half.)
    """
    shared, a, start = one_process_at_batch_16
    process = subprocess.run([sys.executable, "-m", "unizoo.cli", "train", *shared, "data.batch_size=8", f"trainer={trainer}",
                              "trainer.devices=2", f"run_root={tmp_path}"], capture_output=True, text=True, timeout=600, check=False)
    assert process.returncode == 0, process.stderr[-4000:]
    (two,) = (tmp_path / "default").iterdir()
    if trainer == "fsdp":  # each process held about half of the parameters
        held = [int(n) for n in re.findall(r"fully sharded over 2 processes: this one holds (\d+) of", process.stderr)]
        total = int(re.search(r"holds \d+ of (\d+) parameters", process.stderr).group(1))
        assert len(held) == 2 and sum(held) == total and max(held) < 0.51 * total, held

    b = state(two / "checkpoints" / "generation.ckpt")
    assert a.keys() == b.keys()
    moved = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], start[k])]
    assert len(moved) > 20, moved  # the comparison is about weights that trained
    worst = max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point())
    assert worst < 1e-5, worst
