"""`logger=tensorboard|wandb|mlflow`: each writes the losses, the evaluator scores and the sample grids, read back with
the logger's own reader."""

from __future__ import annotations

import importlib.util
import time

from PIL import Image

from conftest import STAGE_STEPS, TINY_OVERRIDES
from unizoo.cli import main

STEPS = 4  # STAGE_STEPS["generation"]


def _train(tmp_path, logger: str):
    assert main(["train", f"logger={logger}", *TINY_OVERRIDES, *STAGE_STEPS["generation"], f"run_root={tmp_path}"]) == 0
    return next(tmp_path.glob("default/*"))


def test_tensorboard_event_files_hold_losses_scores_and_sample_grids(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    run_dir = _train(tmp_path, "tensorboard")
    stage = EventAccumulator(str(run_dir / "tensorboard" / "generation")).Reload()
    assert {"train/loss", "train/generation"} <= set(stage.Tags()["scalars"])
    assert [event.step for event in stage.Scalars("train/loss")] == list(range(STEPS))  # log_every_n_steps=1

    evaluation = EventAccumulator(str(run_dir / "tensorboard" / "evaluation"), size_guidance={IMAGES: 0}).Reload()
    overall = evaluation.Scalars("generation/overall")
    assert [event.step for event in overall] == [0, STEPS]  # untrained, then after the stage
    assert all(0.0 <= event.value <= 1.0 for event in overall)
    assert {"chance/overall", "generation_raw/overall"} - set(evaluation.Tags()["scalars"]) == {"chance/overall"}
    assert {"samples/untrained", "samples/generation", "samples/generation_raw"} <= set(evaluation.Tags()["images"])
    grid = evaluation.Images("samples/generation")[-1]
    assert grid.step == STEPS
    assert (grid.width, grid.height) == Image.open(run_dir / "samples_generation.png").size


def test_mlflow_store_holds_losses_scores_and_the_grid_artifacts(tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = _train(tmp_path, "mlflow")
    client = MlflowClient(f"sqlite:///{run_dir.resolve() / 'mlflow.db'}")
    runs = {run.info.run_name: run for run in client.search_runs([client.get_experiment_by_name("unizoo").experiment_id])}
    assert set(runs) == {"generation", "evaluation"}
    assert all(run.info.status == "FINISHED" for run in runs.values())
    assert [m.step for m in client.get_metric_history(runs["generation"].info.run_id, "train/loss")] == list(range(STEPS))
    history = client.get_metric_history(runs["evaluation"].info.run_id, "generation/overall")
    assert sorted(m.step for m in history) == [0, STEPS]
    artifacts = {a.path for a in client.list_artifacts(runs["evaluation"].info.run_id, "samples")}
    assert {"samples/samples_untrained.png", "samples/samples_generation.png", "samples/samples_generation_raw.png"} <= artifacts
    assert runs["generation"].data.tags["unizoo.run_dir"] == str(run_dir)


def test_wandb_offline_run_directory_holds_its_history(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = _train(tmp_path, "wandb")
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1  # the stage and the evaluations log into one W&B run
    history = list(offline_runs[0].glob("run-*.wandb"))
    assert len(history) == 1
    # wandb's service process writes the run's records on its own after `finish()` returns: with wandb 0.31, about one
    # run in five held only part of them when read at once (the file's 7-byte header, or 8 of 11 KiB). A process's exit
    # waits for the writes, so `unizoo train` leaves the whole file.
    deadline = time.monotonic() + 60
    while history[0].stat().st_size <= 1000 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert history[0].stat().st_size > 1000
    media = list(offline_runs[0].glob("files/media/images/**/*.png"))
    assert media, "the sample grids are logged as images"


def test_a_missing_logger_package_is_named_with_its_extra(tmp_path, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a))
    assert main(["train", "logger=tensorboard", *TINY_OVERRIDES, f"run_root={tmp_path}"]) == 2
    message = capsys.readouterr().err
    assert "'tensorboard'" in message and "unizoo[loggers]" in message and "logger=csv" in message
    assert not (tmp_path / "default").exists()  # refused before anything was built or written
