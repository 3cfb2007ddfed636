"""Stages and strategies: validation, and the model freezing exactly what a stage says."""

from __future__ import annotations

import pytest
import torch

from unizoo.components.strategies.generation import generation
from unizoo.components.strategies.repa_e import repa_e
from unizoo.components.strategies.stages import Stage, Strategy
from unizoo.model import split_batch


def test_generation_strategy_is_one_stage():
    strategy = generation(steps=7)
    assert [s.name for s in strategy.stages] == ["generation"]
    assert strategy.stages[0].steps == 7 and strategy.stages[0].losses == {"generation": 1.0}


def test_stage_validation():
    with pytest.raises(ValueError, match="steps"):
        Stage("s", {"generation": 1.0}, ("generator",), steps=0)
    with pytest.raises(ValueError, match="sum to 1"):
        Stage("s", {"a": 1.0, "b": 1.0}, ("generator",), steps=1, mixture={"a": 0.5, "b": 0.6})
    with pytest.raises(ValueError, match="not among its losses"):
        Stage("s", {"a": 1.0}, ("generator",), steps=1, mixture={"b": 1.0})
    stage = Stage("s", {"a": 1.0}, ("generator",), steps=1)
    with pytest.raises(ValueError, match="unique"):
        Strategy("x", (stage, stage))


def test_split_batch_by_mixture():
    batch = {"image": torch.arange(10), "caption": [str(i) for i in range(10)]}
    parts = split_batch(batch, {"a": 0.5, "b": 0.5}, ["a", "b"])
    assert parts["a"]["caption"] == [str(i) for i in range(5)]
    assert parts["b"]["image"].tolist() == [5, 6, 7, 8, 9]
    assert split_batch(batch, {}, ["a"])["a"] is batch


def test_repa_e_is_one_stage_that_trains_the_representation_on_three_losses():
    strategy = repa_e(steps=9, representation_alignment_weight=1.5, reconstruction_weight=0.5, representation_lr_scale=0.2)
    (stage,) = strategy.stages
    assert stage.steps == 9 and "representation" in stage.trainable and "generator" in stage.trainable
    assert stage.losses == {"generation": 1.0, "representation_alignment": 1.5, "reconstruction": 0.5}
    assert stage.learning_rates == {"representation": 0.2}


def test_a_learning_rate_scale_needs_a_trained_group_and_a_positive_value():
    with pytest.raises(ValueError, match="does not train"):
        Stage("s", {"a": 1.0}, ("generator",), steps=1, learning_rates={"representation": 0.1})
    with pytest.raises(ValueError, match="positive"):
        Stage("s", {"a": 1.0}, ("generator",), steps=1, learning_rates={"generator": 0.0})
