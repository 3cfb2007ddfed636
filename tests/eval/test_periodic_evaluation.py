"""The score curve: evaluations every K steps and at each stage's end, which never change the training."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from conftest import STAGE_STEPS, TINY_OVERRIDES
from unizoo.config.composition import compose_recipe
from unizoo.eval.periodic_evaluation import EvaluationCurve
from unizoo.training.train import train

SEQUENTIAL = [*TINY_OVERRIDES, "strategy=sequential", *STAGE_STEPS["sequential"]]
MEASURED = ["evaluation.every_n_steps=2", "evaluation.fid=true", "evaluation.diversity.prompts=2",
            "evaluation.diversity.samples=3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    measured = train(compose_recipe("default", [*SEQUENTIAL, *MEASURED]), run_dir=root / "measured")
    plain = train(compose_recipe("default", SEQUENTIAL), run_dir=root / "plain")
    return measured, plain


def test_curve_has_a_point_every_k_steps_and_at_each_stage_end(runs):
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    curve = metrics["curve"]
    assert [(p["phase"], p["stage"], p["step"], p["steps"]) for p in curve] == [
        ("untrained", None, 0, 0),
        ("understanding_step2", "understanding", 2, 2),
        ("understanding", "understanding", 4, 4),
        ("generation_step2", "generation", 2, 6),
        ("generation", "generation", 4, 8),
    ]
    seconds = [p["train_seconds"] for p in curve]
    assert seconds[0] == 0 and seconds == sorted(seconds) and seconds[-1] > 0
    for point in curve:
        assert 0 <= point["generation"]["overall"] <= 1 and point["fid"] > 0
        assert 0 <= point["understanding"]["overall"] <= 1
        # Diversity (extra samples) before training and after stages only.
        assert ("diversity" in point) == ("_step" not in point["phase"])
    assert metrics["generation"]["fid"] == curve[-1]["fid"] and metrics["untrained"]["diversity"] >= 0
    # Grids and captions only for the full evaluations.
    assert (runs[0] / "samples_generation.png").is_file() and not list(runs[0].glob("*_step*"))


def test_stage_throughput_and_parameters(runs):
    training = json.loads((runs[0] / "metrics.json").read_text())["training"]
    assert list(training) == ["understanding", "generation"]
    for stage in training.values():
        assert stage["steps"] == 4 and stage["train_seconds"] > 0 and stage["images_per_s"] > 0
        assert 0 < stage["trainable_params"] < stage["total_params"]
    # Stage 2 freezes the LM: fewer trainable parameters than stage 1, the same model.
    assert training["generation"]["trainable_params"] != training["understanding"]["trainable_params"]
    assert training["generation"]["total_params"] == training["understanding"]["total_params"]


def test_evaluating_during_training_does_not_change_the_weights(runs):
    measured, plain = runs
    for stage in ("understanding", "generation"):
        a = torch.load(measured / "checkpoints" / f"{stage}.ckpt", map_location="cpu", weights_only=False)["state_dict"]
        b = torch.load(plain / "checkpoints" / f"{stage}.ckpt", map_location="cpu", weights_only=False)["state_dict"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
    plain_metrics = json.loads((plain / "metrics.json").read_text())
    assert [p["phase"] for p in plain_metrics["curve"]] == ["untrained", "understanding", "generation"]
    assert "fid" not in plain_metrics["generation"]  # off unless the recipe asks


def test_the_callback_travels_to_spawned_workers_without_the_evaluation():
    # trainer=ddp_cpu spawns workers with a pickled trainer: the callback must pickle, and
    # its copy must not try to evaluate (the curve and the model stay in the launching process).
    curve = EvaluationCurve(lambda phase, full: {"generation": {"overall": 1.0}})
    (callback,) = curve.callbacks("generation", 5)
    copy = pickle.loads(pickle.dumps(callback))
    assert copy.curve is None and copy.every_n_steps == 5 and callback.curve is curve
    assert curve.callbacks("generation", None) == []
    with pytest.raises(ValueError, match="every_n_steps must be at least 1"):
        curve.callbacks("generation", -1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_an_evaluation_in_the_middle_of_a_stage_leaves_the_model_on_the_gpu(tmp_path):
    # Sampling moves the model to the loop's device and back to where it was: back to the CPU, as it once did,
    # left Lightning's next step with weights on the CPU and its batches and optimiser state on the GPU.
    run = train(compose_recipe("default", [*SEQUENTIAL, "evaluation.every_n_steps=2", "trainer.accelerator=gpu", "compile=false"]),
                run_dir=tmp_path / "run")
    phases = [point["phase"] for point in json.loads((run / "metrics.json").read_text())["curve"]]
    assert phases == ["untrained", "understanding_step2", "understanding", "generation_step2", "generation"]
