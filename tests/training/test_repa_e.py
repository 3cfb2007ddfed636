"""REPA-E at tiny size: which loss reaches which weights, and a run that trains the VAE end to end."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate

from conftest import TINY_OVERRIDES
from unizoo.components.strategies.repa_e import STAGE
from unizoo.config.composition import compose_recipe
from unizoo.errors import RecipeError
from unizoo.training.build import build_model
from unizoo.training.train import train

REPA_E = ["strategy=repa_e", "alignment.block=1", "strategy.steps=4"]


def recipe(*extra):
    return compose_recipe("default", [*TINY_OVERRIDES, *REPA_E, *extra])


@pytest.fixture
def model():
    torch.manual_seed(0)
    built = build_model(recipe())
    gates = built.generator.blocks[0].adaLN_modulation[-1]  # open the zero-initialised gates, so every path carries gradient
    torch.nn.init.normal_(gates.weight, std=0.1)
    built.set_stage(instantiate(recipe().strategy).stages[0])
    built.train()
    return built


def images_and_captions():
    torch.manual_seed(1)
    return {"image": torch.rand(4, 3, 32, 32) * 2 - 1, "caption": ["a red circle", "two blue squares"] * 2}


def gradient_sizes(model, loss_name):
    model.zero_grad(set_to_none=True)
    terms = model.loss_functions()[loss_name](images_and_captions())
    model.total_loss(terms).backward()

    def size(params):
        return sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)

    return {
        "vae": size(model.representation.vae.parameters()),
        "generator": size(model.generator.parameters()),
        "head": size(model.alignment.projector.parameters()),
        "backbone": size(model.backbone.parameters()),
    }


def test_the_stage_trains_the_vae_beside_the_generator(model):
    assert model.stage.name == STAGE
    assert all(p.requires_grad for p in model.representation.vae.parameters())
    assert all(p.requires_grad for p in model.generator.parameters())
    assert set(model.stage.losses) == {"generation", "representation_alignment", "reconstruction"}


def test_the_diffusion_loss_sends_no_gradient_into_the_vae(model):
    sizes = gradient_sizes(model, "generation")  # the objective's loss and the REPA term on detached latents
    assert sizes["vae"] == 0.0
    assert sizes["generator"] > 0 and sizes["head"] > 0 and sizes["backbone"] > 0


def test_the_alignment_loss_through_the_held_generator_trains_the_vae_alone(model):
    sizes = gradient_sizes(model, "representation_alignment")
    assert sizes["vae"] > 0
    assert sizes["generator"] == 0.0 and sizes["head"] == 0.0 and sizes["backbone"] == 0.0
    assert all(p.requires_grad for p in model.generator.parameters())  # held only for that pass


def test_the_reconstruction_loss_trains_the_vae_alone(model):
    sizes = gradient_sizes(model, "reconstruction")
    assert sizes["vae"] > 0
    assert sizes["generator"] == 0.0 and sizes["head"] == 0.0 and sizes["backbone"] == 0.0


def test_a_repa_e_run_trains_the_vae_and_measures_its_round_trip_again(tmp_path):
    run = train(recipe(f"run_root={tmp_path}"))
    metrics = json.loads((run / "metrics.json").read_text())
    after = metrics["representation_after"][STAGE]
    assert set(after) == set(metrics["representation"]) >= {"round_trip", "original"}
    assert metrics[STAGE]["round_trip"] == after["round_trip"]
    assert (run / f"round_trip_{STAGE}.png").is_file()
    state = torch.load(run / "checkpoints" / f"{STAGE}.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    torch.manual_seed(0)
    initial = build_model(recipe())
    initial.representation.prepare(_datamodule())  # the cached, pretrained VAE the run started from
    changed = [k for k, v in initial.representation.vae.state_dict().items() if not torch.equal(v, state[f"representation.vae.{k}"])]
    assert changed, "no VAE weight moved"
    # The batch norm's running statistics followed the latents of the training batches.
    assert not torch.equal(initial.representation.batch_norm.running_mean, state["representation.batch_norm.running_mean"])
    log = (run / "logs" / STAGE / "metrics.csv").read_text().splitlines()[0]
    assert {"train/generation", "train/alignment", "train/representation_alignment", "train/reconstruction"} <= set(log.split(","))


def _datamodule():
    data = instantiate(recipe().data)
    data.setup("fit")
    return data


def test_a_target_cache_is_refused_when_the_representation_trains(tmp_path):
    with pytest.raises(RecipeError, match="trains the representation.*set targets=null"):
        train(recipe(f"targets={tmp_path}", f"run_root={tmp_path}"))
