"""Joint vs sequential, trained for real at tiny size: what each stage may and may not change."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from conftest import STAGE_STEPS, TINY_OVERRIDES
from unizoo.config.composition import compose_recipe
from unizoo.training.build import build_model
from unizoo.training.train import train


def weights(run_dir, stage):
    return torch.load(run_dir / "checkpoints" / f"{stage}.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def group(state, prefix):
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def sequential_run(tmp_path_factory):
    overrides = [*TINY_OVERRIDES, "strategy=sequential", *STAGE_STEPS["sequential"],
                 f"run_root={tmp_path_factory.mktemp('runs')}"]
    return train(compose_recipe("default", overrides))


def test_sequential_stage_two_freezes_the_backbone_bit_for_bit(sequential_run):
    stage1, stage2 = weights(sequential_run, "understanding"), weights(sequential_run, "generation")
    assert same(group(stage1, "backbone.lm."), group(stage2, "backbone.lm."))
    assert same(group(stage1, "backbone.projector."), group(stage2, "backbone.projector."))
    assert not torch.equal(stage1["backbone.queries"], stage2["backbone.queries"])
    assert not same(group(stage1, "generator."), group(stage2, "generator."))


def test_sequential_stage_one_trains_only_understanding(sequential_run, tiny_overrides):
    L.seed_everything(0, verbose=False)  # the run's seed: the same initial weights
    initial = build_model(compose_recipe("default", [*tiny_overrides, "strategy=sequential"])).state_dict()
    stage1 = weights(sequential_run, "understanding")
    assert not same(group(initial, "backbone.lm."), group(stage1, "backbone.lm."))
    assert not same(group(initial, "backbone.projector."), group(stage1, "backbone.projector."))
    assert same(group(initial, "generator."), group(stage1, "generator."))
    assert torch.equal(initial["backbone.queries"], stage1["backbone.queries"])


def test_stage_two_leaves_the_understanding_score_exactly_unchanged(sequential_run):
    metrics = json.loads((sequential_run / "metrics.json").read_text())
    assert metrics["understanding"]["understanding"] == metrics["generation"]["understanding"]
    captions = [(sequential_run / f"captions_{stage}.txt").read_text() for stage in ("understanding", "generation")]
    assert captions[0] == captions[1]


def test_a_run_can_start_at_stage_two_from_stage_one(sequential_run, tiny_overrides):
    run = train(compose_recipe("default", [*tiny_overrides, "strategy=sequential", "strategy.generation_steps=2",
                                           "start_stage=generation", f"init_checkpoint={sequential_run / 'checkpoints' / 'understanding.ckpt'}"]))
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) >= {"start", "generation"} and "understanding" not in metrics.get("seconds", {})
    assert same(group(weights(sequential_run, "understanding"), "backbone.lm."), group(weights(run, "generation"), "backbone.lm."))


def test_stage_two_may_reshape_what_stage_one_never_trained(sequential_run, tiny_overrides, caplog):
    """One stage-1 run, a different stage-2 generator: what stage 1 trained loads exactly, the rest starts fresh."""
    stage1 = weights(sequential_run, "understanding")
    with caplog.at_level("INFO", logger="unizoo"):
        run = train(compose_recipe("default", [*tiny_overrides, "strategy=sequential", "strategy.generation_steps=2",
                                               "generator.depth=2", "backbone.num_queries=6", "start_stage=generation",
                                               f"init_checkpoint={sequential_run / 'checkpoints' / 'understanding.ckpt'}"]))
    stage2 = weights(run, "generation")
    assert same(group(stage1, "backbone.lm."), group(stage2, "backbone.lm."))
    assert same(group(stage1, "backbone.projector."), group(stage2, "backbone.projector."))
    assert stage2["backbone.queries"].shape[0] == 6 and "generator.blocks.1.attn.qkv.weight" in stage2
    assert "start from this run's initialisation" in caplog.text and "generator" in caplog.text


def test_stage_two_still_refuses_a_checkpoint_whose_stage_one_work_does_not_fit(sequential_run, tiny_overrides):
    """The backbone is stage 1's work: a recipe with another LM must not start from it silently."""
    lm = "+backbone.config_overrides={hidden_size:32,intermediate_size:64,num_hidden_layers:2,num_attention_heads:2,num_key_value_heads:1}"
    overrides = [o for o in tiny_overrides if not o.startswith("+backbone.config_overrides")]
    with pytest.raises(RuntimeError, match="backbone.lm"):
        train(compose_recipe("default", [*overrides, lm, "strategy=sequential", "strategy.generation_steps=2",
                                         "start_stage=generation",
                                         f"init_checkpoint={sequential_run / 'checkpoints' / 'understanding.ckpt'}"]))


def test_joint_trains_the_backbone_with_both_losses(tiny_overrides):
    overrides = [*tiny_overrides, "strategy=joint", "strategy.steps=4"]
    L.seed_everything(0, verbose=False)
    initial = build_model(compose_recipe("default", overrides)).state_dict()
    run = train(compose_recipe("default", overrides))
    final = weights(run, "joint")
    assert not same(group(initial, "backbone.lm."), group(final, "backbone.lm."))
    assert not same(group(initial, "generator."), group(final, "generator."))
    logged = (run / "logs" / "joint" / "metrics.csv").read_text().splitlines()[0]
    assert "train/generation" in logged and "train/understanding" in logged


def test_start_stage_without_weights_is_a_clear_error(tiny_overrides):
    with pytest.raises(FileNotFoundError, match="init_checkpoint"):
        train(compose_recipe("default", [*tiny_overrides, "strategy=sequential", "start_stage=generation"]))


def test_caption_command_captions_images_and_skips_broken_ones(sequential_run, tmp_path, capsys):
    from unizoo.cli import main
    from unizoo.data.datamodule import ShapesDataset
    from unizoo.data.shapes import draw_scene

    good = tmp_path / "shapes.png"
    draw_scene(ShapesDataset("test", 1).scene(0), 64).save(good)  # another size: resized to the run's 32 px
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert main(["caption", str(sequential_run), str(good), str(broken)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()  # "PATH<tab>caption"; a 4-step model's caption may be empty
    assert len(lines) == 1 and lines[0].split("\t")[0] == str(good)
    assert "skipped" in captured.err and "broken.png" in captured.err


def test_caption_command_on_a_run_without_vision_is_a_clear_error(tmp_path, tiny_overrides, capsys):
    from unizoo.cli import main

    run = train(compose_recipe("default", [*tiny_overrides, "strategy.steps=1"]))
    assert main(["caption", str(run), str(tmp_path / "x.png")]) == 2
    assert "without a vision encoder" in capsys.readouterr().err
