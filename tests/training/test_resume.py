"""Exact resume: a sequential run killed with SIGKILL mid-stage, resumed, ends bit-identical to the uninterrupted run.

Each run is a real `unizoo train` process. `debug.pause_at` makes the run wait at a known
step (its checkpoint of the step before is on disk) so that the test's `kill -9` lands
mid-stage every time, not only when the timing happens to suit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_OVERRIDES

# 24 training images at batch 8: 3 batches per epoch, so 5 steps cross an epoch boundary
# and the kills land mid-epoch in epoch 0 (stage 1, after 2 steps) and epoch 1 (stage 2, after 4).
RECIPE = [
    *TINY_OVERRIDES,
    "data.train_size=24",
    "strategy=sequential",
    "strategy.understanding_steps=5",
    "strategy.generation_steps=5",
    "checkpoint.every_n_steps=1",
]
KILLS = {"stage1": "understanding:3", "stage2": "generation:5"}


def unizoo(*arguments: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "unizoo.cli", "train", *arguments],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-4000:]
    return out.strip().splitlines()[-1]


def run_dir_of(root: Path) -> Path:
    (run_dir,) = (root / "default").iterdir()
    return run_dir


def kill_when_paused(process: subprocess.Popen, root: Path, stage: str, step: int) -> Path:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the run ended before pausing at {stage}:{step}: {process.stderr.read()[-4000:]}")
        runs = list((root / "default").glob(f"*/paused-{stage}-{step}")) if (root / "default").is_dir() else []
        if runs:
            os.kill(process.pid, signal.SIGKILL)
            process.communicate(timeout=60)
            assert process.returncode == -signal.SIGKILL
            return runs[0].parent
        time.sleep(0.2)
    process.kill()
    pytest.fail(f"the run never paused at {stage}:{step}")


def state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def assert_bit_identical(a: Path, b: Path) -> None:
    first, second = state(a), state(b)
    assert first.keys() == second.keys()
    different = [key for key in first if not torch.equal(first[key], second[key])]
    assert not different, f"{len(different)} of {len(first)} tensors differ, e.g. {different[:5]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    return Path(finish(unizoo(*RECIPE, f"run_root={root}")))


@pytest.fixture(scope="module", params=sorted(KILLS))
def resumed(request, tmp_path_factory) -> tuple[str, Path]:
    """A run killed at KILLS[param] and resumed to the end."""
    root = tmp_path_factory.mktemp(request.param)
    stage, step = KILLS[request.param].split(":")
    killed = kill_when_paused(unizoo(*RECIPE, f"run_root={root}", f"debug.pause_at={KILLS[request.param]}"), root, stage, int(step))
    checkpoints = killed / "checkpoints"
    assert not (checkpoints / f"{stage}.ckpt").exists(), "killed after the stage ended: not mid-stage"
    assert (checkpoints / stage / f"step{int(step) - 1}.ckpt").is_file()
    if request.param == "stage2":
        # A kill during a save: a half-written temporary file, and (as a non-atomic writer would
        # leave it) a truncated last.ckpt. Resume must fall back to the newest complete checkpoint.
        last = checkpoints / stage / "last.ckpt"
        (checkpoints / stage / ".last.ckpt.12345.tmp").write_bytes(last.read_bytes()[:1000])
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    finished_stages = {path.name: path.stat().st_mtime_ns for path in checkpoints.glob("*.ckpt")}
    assert Path(finish(unizoo(f"resume={killed}", "debug.pause_at=null"))) == killed
    return request.param, killed, finished_stages


def test_resumed_run_ends_bit_identical_to_the_uninterrupted_one(reference, resumed):
    _, run_dir, _ = resumed
    for stage in ("understanding", "generation"):
        assert_bit_identical(reference / "checkpoints" / f"{stage}.ckpt", run_dir / "checkpoints" / f"{stage}.ckpt")


def test_resumed_run_logs_the_losses_of_the_uninterrupted_one(reference, resumed):
    _, run_dir, _ = resumed
    for stage in ("understanding", "generation"):
        logged = [(d / "logs" / stage / "metrics.csv").read_text().splitlines() for d in (reference, run_dir)]
        assert len(logged[0]) > 5 and logged[0] == logged[1]  # every step once, with the same loss


def test_resumed_run_keeps_earlier_evaluations_and_records_the_resume(reference, resumed):
    which, run_dir, finished_before = resumed
    expected, metrics = (json.loads((d / "metrics.json").read_text()) for d in (reference, run_dir))
    for phase in ("untrained", "understanding", "generation"):
        assert metrics[phase] == expected[phase]
    stage, step = KILLS[which].split(":")
    assert [(r["stage"], r["step"]) for r in metrics["resumed"]] == [(stage, int(step) - 1)]
    if which == "stage2":  # stage 1 finished before the kill: skipped, its checkpoint untouched
        assert finished_before == {"understanding.ckpt": (run_dir / "checkpoints" / "understanding.ckpt").stat().st_mtime_ns}
        assert metrics["resumed"][0]["from"].endswith("step4.ckpt")  # last.ckpt was truncated
    else:
        assert finished_before == {}


def test_resume_refuses_recipe_changes(reference, capsys):
    from unizoo.cli import main

    assert main(["train", f"resume={reference}", "optimizer.lr=1"]) == 2
    error = capsys.readouterr().err
    assert "optimizer.lr=1" in error and "trainer.<key>" in error and "init_checkpoint" in error


def test_resume_of_a_finished_run_changes_nothing(reference):
    before = state(reference / "checkpoints" / "generation.ckpt")
    assert Path(finish(unizoo(f"resume={reference}", "trainer.devices=1"))) == reference
    after = state(reference / "checkpoints" / "generation.ckpt")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_of_a_directory_that_is_no_run_exits_2(tmp_path, capsys):
    from unizoo.cli import main

    assert main(["train", f"resume={tmp_path}"]) == 2
    assert "not a unizoo run directory" in capsys.readouterr().err
