"""A NaN in a loss term stops the stage cleanly: the message names the step, the term and the last good checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import STAGE_STEPS
from unizoo.cli import TRAINING_FAILED, main


def only_run(root):
    (run_dir,) = (root / "default").iterdir()
    return run_dir


@pytest.mark.parametrize(("strategy", "terms"), [("generation", ["generation"]), ("joint", ["generation", "understanding"])])
def test_nan_stops_the_stage_and_keeps_the_last_good_checkpoint(strategy, terms, tiny_overrides, tmp_path, capsys):
    code = main(["train", *tiny_overrides, f"strategy={strategy}", "strategy.steps=5", "checkpoint.every_n_steps=1",
                 f"debug.nan_at={strategy}:3"])
    assert code == TRAINING_FAILED
    error = capsys.readouterr().err
    run_dir = only_run(tmp_path / "runs")
    last = run_dir / "checkpoints" / strategy / "last.ckpt"
    assert f"stage {strategy!r} stopped at step 3" in error
    assert f"{', '.join(f'{term}=nan' for term in terms)}" in error
    assert f"the last good checkpoint is {last} (after step 2), kept" in error
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2
    assert all(torch.isfinite(value).all() for value in checkpoint["state_dict"].values() if value.is_floating_point())
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt", "step2.ckpt"]  # nothing saved after the NaN
    assert not (run_dir / "checkpoints" / f"{strategy}.ckpt").exists()
    assert strategy not in json.loads((run_dir / "metrics.json").read_text())  # no evaluation of a broken stage


def test_nan_before_any_checkpoint_of_the_stage_says_so(tiny_overrides, tmp_path, capsys):
    overrides = [*tiny_overrides, "strategy=sequential", *STAGE_STEPS["sequential"], "debug.nan_at=generation:1"]
    assert main(["train", *overrides]) == TRAINING_FAILED
    error = capsys.readouterr().err
    first_stage = only_run(tmp_path / "runs") / "checkpoints" / "understanding.ckpt"
    assert "stopped at step 1" in error and "generation=nan" in error
    assert f"this stage saved no checkpoint yet; the last good one is {first_stage}" in error
    assert first_stage.is_file()


def test_finite_losses_train_through(tiny_overrides, tmp_path):
    assert main(["train", *tiny_overrides, *STAGE_STEPS["generation"], "checkpoint.every_n_steps=1"]) == 0
    assert (only_run(tmp_path / "runs") / "checkpoints" / "generation.ckpt").is_file()


def test_bad_debug_position_is_a_usage_error(tiny_overrides, tmp_path, capsys):
    assert main(["train", *tiny_overrides, *STAGE_STEPS["generation"], "debug.nan_at=3"]) == 2
    error = capsys.readouterr().err
    assert "debug.nan_at=3: expected '<stage>:<step>' with <stage> one of generation" in error
    assert not (tmp_path / "runs").exists()  # refused before a run directory was made


def test_a_spawned_worker_s_non_finite_loss_is_found_in_its_traceback():
    from torch.multiprocessing import ProcessRaisedException

    from unizoo.training.nonfinite import raised_in_a_worker

    text = ("\n\n-- Process 1 terminated with the following error:\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
            "unizoo.training.nonfinite.NonFiniteLoss: stage 'joint' stopped at step 3: non-finite loss term generation=nan.\n")
    found = raised_in_a_worker(ProcessRaisedException(text, 1, 123))
    assert str(found) == "stage 'joint' stopped at step 3: non-finite loss term generation=nan."
    assert raised_in_a_worker(ProcessRaisedException("RuntimeError: something else", 1, 123)) is None
