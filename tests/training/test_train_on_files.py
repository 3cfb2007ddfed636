"""Acceptance: `unizoo train data=folder` on a folder of real image files with some corrupt ones, end to end."""

from __future__ import annotations

import json
import math

import pytest

from conftest import STAGE_STEPS, TINY_OVERRIDES
from image_folder import BAD, shapes_free, write_image_folder
from unizoo.cli import main

IMAGES = 500


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_image_folder(root, IMAGES)
    return root


def _train(arguments: list[str], run_root) -> tuple[dict, object]:
    overrides = [*shapes_free(TINY_OVERRIDES), *STAGE_STEPS["generation"], "evaluation.prompts=8", f"run_root={run_root}"]
    assert main(["train", *arguments, *overrides]) == 0
    (run_dir,) = (run_root / "default").iterdir()
    return json.loads((run_dir / "metrics.json").read_text()), run_dir


def _assert_scored_without_the_shapes_evaluator(metrics: dict) -> None:
    final = metrics["generation"]
    assert "overall" not in final["generation"] and 0.0 <= final["generation"]["agreement"] <= 100.0
    assert math.isfinite(final["fid"]) and final["fid"] >= 0.0
    assert set(metrics["chance"]) == {"agreement"} and set(metrics["real"]) == {"agreement"}


def test_train_on_an_image_folder_skips_and_reports_the_corrupt_files(image_folder, tmp_path):
    metrics, run_dir = _train(["data=folder", f"data.path={image_folder}"], tmp_path / "runs")
    assert metrics["data"]["skipped"] == BAD
    for grid in ("samples_untrained.png", "samples_generation.png"):
        assert (run_dir / grid).stat().st_size > 0
    # Free-text captions: the shapes evaluator is not applied; FID and the caption-image agreement are.
    _assert_scored_without_the_shapes_evaluator(metrics)
    log = (run_dir / "train.log").read_text()
    assert "data: epoch 0: skipped 6 samples" in log and "undecodable_image 1" in log
    vocabulary = json.loads((run_dir / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert {"triangle", "above", "magenta"} <= set(vocabulary) and len(vocabulary) == 4 + 21


def test_train_on_shards_written_by_unizoo_shards(image_folder, tmp_path):
    assert main(["shards", str(image_folder), str(tmp_path / "shards"), "--samples-per-shard", "32"]) == 0
    shards = tmp_path / "shards"
    metrics, run_dir = _train(
        ["data=webdataset", f"data.urls={shards}/train-*.tar", f"data.val_urls={shards}/val-*.tar", "data.shuffle_buffer=16"],
        tmp_path / "runs",
    )
    # The writer leaves out what listing finds bad; the truncated JPEG is stored and found when decoded.
    assert metrics["data"]["skipped"] == {"undecodable_image": 1}
    assert (run_dir / "samples_generation.png").stat().st_size > 0
    _assert_scored_without_the_shapes_evaluator(metrics)
