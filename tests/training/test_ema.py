"""EMA of the generator: the warmed-up average, its place in checkpoints, evaluation with and without it, sampling with it."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import STAGE_STEPS
from unizoo.config.composition import RecipeError, compose_recipe
from unizoo.training.ema import (
    GeneratorEMA,
    attach_ema,
    ema_weights,
    generator_ema,
    load_weights,
    scores_with_and_without_ema,
    warmed_up_decay,
)
from unizoo.training.runs import load_run
from unizoo.training.train import train


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.generator = nn.Linear(2, 1, bias=False)


def test_decay_warms_up_to_its_cap():
    assert warmed_up_decay(0.9999, 0) == pytest.approx(0.1)
    assert warmed_up_decay(0.9999, 90) == pytest.approx(0.91)
    assert warmed_up_decay(0.9999, 10**7) == 0.9999
    assert warmed_up_decay(0.5, 90) == 0.5


def test_average_follows_the_closed_form():
    model = Holder()
    attach_ema(model, 0.9)
    average = generator_ema(model)
    assert not any(p.requires_grad for p in average.parameters())
    values = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]]), torch.tensor([[0.5, 0.5]])]
    expected = None
    for n, value in enumerate(values):
        with torch.no_grad():
            model.generator.weight.copy_(value)
        average.update_parameters(model.generator)
        # the first update copies; update n (from 1) keeps d = min(0.9, (1 + n) / (10 + n)) of the average
        expected = value if expected is None else warmed_up_decay(0.9, n) * expected + (1 - warmed_up_decay(0.9, n)) * value
        assert torch.allclose(average.module.weight, expected)
    assert int(average.n_averaged) == 3


def test_ema_weights_swap_in_and_back():
    model = Holder()
    attach_ema(model, 0.9)
    average = generator_ema(model)
    average.update_parameters(model.generator)
    with torch.no_grad():
        model.generator.weight.add_(1.0)
    trained, averaged = model.generator.weight.detach().clone(), average.module.weight.detach().clone()
    assert not torch.equal(trained, averaged)
    with ema_weights(model):
        assert torch.equal(model.generator.weight, averaged)
    assert torch.equal(model.generator.weight, trained) and torch.equal(average.module.weight, averaged)
    assert scores_with_and_without_ema(model, lambda suffix: {"w": model.generator.weight.sum().item(), "as": suffix}) == {
        "generation": {"w": pytest.approx(averaged.sum().item()), "as": ""},
        "generation_raw": {"w": pytest.approx(trained.sum().item()), "as": "_raw"},
    }


def test_no_ema_before_its_first_update_scores_once():
    model = Holder()
    attach_ema(model, 0.9)
    assert scores_with_and_without_ema(model, lambda suffix: suffix) == {"generation": ""}


def test_bad_decay_is_a_recipe_error():
    with pytest.raises(RecipeError, match="ema.decay=1.5"):
        attach_ema(Holder(), 1.5)


@pytest.fixture(scope="module")
def sequential_run(tmp_path_factory):
    from conftest import TINY_OVERRIDES

    overrides = [*TINY_OVERRIDES, "strategy=sequential", *STAGE_STEPS["sequential"], f"run_root={tmp_path_factory.mktemp('runs')}"]
    return train(compose_recipe("default", overrides))


def test_checkpoints_hold_the_ema_and_metrics_both_scores(sequential_run):
    metrics = json.loads((sequential_run / "metrics.json").read_text())
    # Stage 1 does not train the generator: its EMA has no update yet and one score stands for both.
    assert "generation_raw" not in metrics["understanding"]
    assert {"generation", "generation_raw"} <= metrics["generation"].keys()
    for scores in (metrics["generation"]["generation"], metrics["generation"]["generation_raw"]):
        assert 0.0 <= scores["overall"] <= 1.0 and scores["n"] == 4
    assert (sequential_run / "samples_generation_raw.png").read_bytes() != (sequential_run / "samples_generation.png").read_bytes()

    state = torch.load(sequential_run / "checkpoints" / "generation.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert int(state["generator_ema.n_averaged"]) == 4  # one update per step of stage 2, none in stage 1
    ema_keys = [k for k in state if k.startswith("generator_ema.module.")]
    assert len(ema_keys) == len([k for k in state if k.startswith("generator.")])
    assert any(not torch.equal(state[k], state[k.replace("generator_ema.module.", "generator.")]) for k in ema_keys)


def test_sampling_uses_the_ema_weights(sequential_run):
    _, model = load_run(sequential_run)
    state = torch.load(sequential_run / "checkpoints" / "generation.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    for name, value in model.generator.state_dict().items():
        assert torch.equal(value, state[f"generator_ema.module.{name}"]), name


def test_ema_off(tiny_overrides):
    run_dir = train(compose_recipe("default", [*tiny_overrides, *STAGE_STEPS["generation"], "ema.decay=null"]))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "generation_raw" not in metrics["generation"]
    state = torch.load(run_dir / "checkpoints" / "generation.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert not any(k.startswith("generator_ema") for k in state)


def test_callback_updates_once_per_optimiser_step():
    class Trainer:
        global_step = 0

    model, trainer, callback = Holder(), Trainer(), GeneratorEMA()
    attach_ema(model, 0.9)
    callback.on_train_start(trainer, model)
    for step in (0, 1, 1, 2, 2, 3):  # batches that end without a step (accumulation) repeat global_step
        trainer.global_step = step
        callback.on_train_batch_end(trainer, model, None, None, 0)
    assert int(generator_ema(model).n_averaged) == 3


def test_weights_saved_without_an_ema_load_into_a_model_with_one():
    plain, averaged = Holder(), Holder()
    attach_ema(averaged, 0.9)
    generator_ema(averaged).update_parameters(averaged.generator)
    load_weights(averaged, plain.state_dict())
    assert torch.equal(averaged.generator.weight, plain.generator.weight)
    assert int(generator_ema(averaged).n_averaged) == 0  # starts afresh from the loaded weights
    with pytest.raises(RuntimeError, match="Unexpected key"):
        load_weights(averaged, {**plain.state_dict(), "stray": torch.zeros(1)})
