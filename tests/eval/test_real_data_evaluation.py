"""A run on data without an exact evaluator reports FID and the caption-image agreement instead of GenEval scores.

The real-data modules (folder, webdataset) say `has_exact_evaluator = False`; here the shapes
data stands in for them, marked so, which makes the run treat it as opaque images.
"""

from __future__ import annotations

import json
import math

import pytest

from conftest import STAGE_STEPS, TINY_OVERRIDES
from unizoo.cli import main
from unizoo.data.datamodule import ShapesDataModule

SHAPES_CATEGORIES = {"overall", "single_object", "colors", "strict_overall"}


def _run(tmp_path, *overrides: str) -> dict:
    assert main(["train", *TINY_OVERRIDES, *STAGE_STEPS["generation"], f"run_root={tmp_path}", *overrides]) == 0
    run_dir = next(tmp_path.glob("default/*"))
    return json.loads((run_dir / "metrics.json").read_text())


def _finite(value) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def test_data_without_exact_evaluator_reports_fid_and_agreement(tmp_path, monkeypatch):
    monkeypatch.setattr(ShapesDataModule, "has_exact_evaluator", False, raising=False)
    metrics = _run(tmp_path)  # evaluation.fid and evaluation.agreement.enabled stay at their defaults (false)
    for phase in ("untrained", "generation"):
        assert _finite(metrics[phase]["fid"]) and metrics[phase]["fid"] >= 0.0
        for weights in ("generation", "generation_raw") if phase == "generation" else ("generation",):
            scores = metrics[phase][weights]
            assert set(scores) == {"agreement"}, scores  # no shapes categories
            assert _finite(scores["agreement"]) and 0.0 <= scores["agreement"] <= 100.0
    # The levels a reader judges the number by: real val images against other images' captions and their own.
    assert set(metrics["chance"]) == {"agreement"} and set(metrics["real"]) == {"agreement"}
    assert _finite(metrics["chance"]["agreement"]) and _finite(metrics["real"]["agreement"])
    assert not SHAPES_CATEGORIES & set(metrics["representation"])  # the round trip is read in agreement too
    assert _finite(metrics["representation"]["round_trip"])


def test_shapes_keeps_its_evaluator_and_adds_agreement_on_request(tmp_path):
    metrics = _run(tmp_path, "evaluation.agreement.enabled=true")
    scores = metrics["generation"]["generation"]
    assert 0.0 <= scores["overall"] <= 1.0 and _finite(scores["agreement"])
    assert {"overall", "agreement"} <= set(metrics["chance"]) and {"overall", "agreement"} <= set(metrics["real"])
    assert metrics["real"]["overall"] == pytest.approx(1.0)  # the exact evaluator reads real images perfectly
    assert "fid" not in metrics["generation"]  # FID stays opt-in for data with an exact evaluator
