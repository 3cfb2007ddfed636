"""Stages that train until their curve is flat: the rule on synthetic curves, and a real stage that stops."""

from __future__ import annotations

import json

import pytest

from conftest import TINY_OVERRIDES
from unizoo.cli import main
from unizoo.components.strategies.generation import generation
from unizoo.components.strategies.stages import UntilFlat
from unizoo.components.strategies.sequential import sequential
from unizoo.errors import RecipeError
from unizoo.training.until_flat import FLAT, RISING, check_until_flat, stage_scores, verdict

RULE = UntilFlat(window=2, min_gain=0.01, max_steps=1000)


@pytest.mark.parametrize(("scores", "flat"), [
    ([0.1, 0.2], False),                      # too short to tell: window + 1 points needed
    ([0.1, 0.2, 0.3], False),                 # rising
    ([0.1, 0.5, 0.505, 0.509], True),         # the last two beat 0.5 by less than 0.01
    ([0.1, 0.5, 0.505, 0.511], False),        # ... by 0.011: still rising
    ([0.3, 0.6, 0.4, 0.59], True),            # fell back: nothing new above the best
    ([0.3, 0.2, 0.1, 0.0, 0.31], False),      # a late gain counts against the best so far (0.3), not the last point
])
def test_the_rule_on_synthetic_curves(scores, flat):
    assert RULE.is_flat(scores) is flat


def test_a_curve_stops_at_the_first_flat_evaluation():
    curve = [0.05, 0.20, 0.35, 0.45, 0.52, 0.55, 0.556, 0.558, 0.56, 0.57]
    first = next(n for n in range(1, len(curve) + 1) if RULE.is_flat(curve[:n]))
    assert first == 8  # 0.556, 0.558 beat 0.55 by 0.008 < 0.01


def test_strategies_take_until_flat_and_stretch_their_generation_stage_to_max_steps():
    (stage,) = generation(steps=50, until_flat={"window": 2, "max_steps": 300}).stages
    assert stage.steps == 300 and stage.until_flat == UntilFlat(window=2, min_gain=0.01, max_steps=300)
    understanding, second = sequential(understanding_steps=40, until_flat={"max_steps": 500}).stages
    assert understanding.steps == 40 and understanding.until_flat is None  # scored by understanding, not the generator
    assert second.steps == 500
    with pytest.raises(ValueError, match="unknown keys \\['patience'\\]; valid keys: window, min_gain, max_steps"):
        generation(until_flat={"patience": 3})


def test_until_flat_needs_the_curve_it_watches():
    stages = list(generation(until_flat={"max_steps": 100}).stages)
    with pytest.raises(RecipeError, match="needs evaluation.every_n_steps"):
        check_until_flat(stages, None)
    check_until_flat(stages, 10)


def test_the_verdict_names_a_cell_that_never_flattened():
    assert verdict(RULE, [0.1, 0.3, 0.5, 0.7], None, 1000)["state"] == RISING
    assert verdict(RULE, [0.1, 0.5, 0.505, 0.509], None, 1000) == {
        "state": FLAT, "step": 1000, "max_steps": 1000, "window": 2, "min_gain": 0.01}  # flat at its end
    assert verdict(RULE, [0.1, 0.5, 0.505], 300, 300)["state"] == FLAT


def test_stage_scores_are_the_stage_s_periodic_points():
    points = [{"phase": "untrained", "stage": None, "generation": {"overall": 0.1}},
              {"phase": "generation_step10", "stage": "generation", "generation": {"overall": 0.2}},
              {"phase": "generation_step20", "stage": "generation", "generation": {"overall": 0.3}},
              {"phase": "generation", "stage": "generation", "generation": {"overall": 0.35}}]
    assert stage_scores(points, "generation", "overall") == [0.2, 0.3]


def test_a_stage_stops_when_its_curve_is_flat(tiny_overrides, tmp_path):
    # min_gain 1: no gain is ever enough, so the curve is flat at its second evaluation (step 4 of at most 40).
    assert main(["train", *tiny_overrides, "evaluation.every_n_steps=2", "+strategy.until_flat={window:1,min_gain:1.0,max_steps:40}",
                 "checkpoint.every_n_steps=2"]) == 0
    (run_dir,) = (tmp_path / "runs" / "default").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["converged"]["generation"] == {"state": FLAT, "step": 4, "max_steps": 40, "window": 1, "min_gain": 1.0}
    assert metrics["training"]["generation"]["steps"] == 4
    assert [p["phase"] for p in metrics["curve"]] == ["untrained", "generation_step2", "generation_step4", "generation"]


def test_a_stage_that_never_flattens_says_so(tiny_overrides, tmp_path):
    assert main(["train", *tiny_overrides, "evaluation.every_n_steps=2", "+strategy.until_flat={window:2,min_gain:-1.0,max_steps:4}"]) == 2
    assert main(["train", *tiny_overrides, "evaluation.every_n_steps=2", "+strategy.until_flat={window:5,min_gain:0.0,max_steps:4}"]) == 0
    (run_dir,) = (tmp_path / "runs" / "default").iterdir()
    converged = json.loads((run_dir / "metrics.json").read_text())["converged"]["generation"]
    assert converged["state"] == RISING and converged["step"] == 4  # 5 evaluations never happened: not flat
