"""UnifiedModel's losses: named terms with weights, the alignment's term beside the objective's, per-group learning rates."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_OVERRIDES
from unizoo.components.strategies.stages import Stage
from unizoo.config.composition import compose_recipe
from unizoo.model import frozen
from unizoo.training.build import build_model

GENERATION = Stage(name="generation", losses={"generation": 2.0}, trainable=("backbone", "queries", "generator"), steps=1)


def tiny_model(*overrides):
    torch.manual_seed(0)
    return build_model(compose_recipe("default", [*TINY_OVERRIDES, *overrides]))


def batch(size=4):
    torch.manual_seed(1)
    return {"image": torch.rand(size, 3, 32, 32) * 2 - 1, "caption": ["a red circle", "two blue squares"] * (size // 2)}


def test_alignment_none_gives_the_objectives_loss_alone():
    model = tiny_model()
    model.set_stage(GENERATION)
    data = batch()
    torch.manual_seed(2)
    terms = model.stage_terms(data)
    torch.manual_seed(2)
    direct = model.objective.loss(model.generator, model.representation.encode(data["image"]), model.backbone.condition(data["caption"]))
    assert list(terms) == ["generation"]
    value, weight = terms["generation"]
    assert weight == 2.0 and value.item() == pytest.approx(direct.item(), abs=0)
    assert model.total_loss(terms).item() == pytest.approx(2.0 * direct.item(), rel=1e-6)


def test_repa_adds_its_term_with_the_recipes_weight_times_the_stages():
    model = tiny_model("alignment=repa", "alignment.block=1", "alignment.weight=0.25")
    model.set_stage(GENERATION)
    torch.manual_seed(2)
    terms = model.stage_terms(batch())
    assert set(terms) == {"generation", "alignment"}
    assert terms["alignment"][1] == pytest.approx(2.0 * 0.25) and terms["generation"][1] == 2.0
    assert 0.0 <= terms["alignment"][0].item() <= 2.0  # 1 - cos
    expected = 2.0 * terms["generation"][0] + 0.5 * terms["alignment"][0]
    assert model.total_loss(terms).item() == pytest.approx(expected.item(), rel=1e-6)
    # The same generation term as without REPA: the capture changes nothing in the forward pass.
    plain = tiny_model()
    plain.set_stage(GENERATION)
    torch.manual_seed(2)
    assert plain.stage_terms(batch())["generation"][0].item() == pytest.approx(terms["generation"][0].item(), abs=0)


def test_repas_head_trains_with_the_generator_and_its_encoder_never():
    model = tiny_model("alignment=repa", "alignment.block=1")
    groups = model.parameter_groups()
    head = {id(p) for p in model.alignment.projector.parameters()}
    assert head <= {id(p) for p in groups["generator"]}
    encoder = {id(p) for p in model.alignment.encoder.parameters()}
    assert not encoder & {id(p) for params in groups.values() for p in params}
    model.set_stage(GENERATION)
    assert all(p.requires_grad for p in model.alignment.projector.parameters())
    assert not any(p.requires_grad for p in model.alignment.encoder.parameters())
    model.set_stage(Stage(name="understanding", losses={"understanding": 1.0}, trainable=("backbone",), steps=1))
    assert not any(p.requires_grad for p in model.alignment.projector.parameters())


def test_training_with_repa_lowers_the_alignment_loss():
    model = tiny_model("alignment=repa", "alignment.block=1", "alignment.weight=1.0")
    model.set_stage(GENERATION)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    data = batch(8)
    losses = []
    for step in range(30):
        torch.manual_seed(step)
        terms = model.stage_terms(data)
        losses.append(terms["alignment"][0].item())
        optimizer.zero_grad()
        model.total_loss(terms).backward()
        optimizer.step()
    assert losses[-1] < 0.8 * losses[0], losses  # 1.00 -> 0.70 here: noisy inputs bound how well features can be predicted


def test_frozen_takes_no_gradient_and_restores_the_flags():
    layer, other = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    other.weight.requires_grad_(False)
    x = torch.randn(3, 2, requires_grad=True)
    with frozen(layer, other):
        out = layer(x).sum()
    out.backward()
    assert layer.weight.grad is None and x.grad is not None
    assert layer.weight.requires_grad and not other.weight.requires_grad and other.bias.requires_grad


def test_a_stage_scales_a_groups_learning_rate():
    model = tiny_model("strategy=repa_e", "alignment.block=1")
    stage = Stage(name="s", losses={"generation": 1.0}, trainable=("generator", "representation"), steps=1,
                  learning_rates={"representation": 0.1})
    model.set_stage(stage)
    optimizer = model.make_optimizer()
    base = model.optimizer_factory.keywords["lr"]
    rates = {round(group["lr"], 12): {id(p) for p in group["params"]} for group in optimizer.param_groups}
    assert rates[round(base * 0.1, 12)] == {id(p) for p in model.representation.vae.parameters()}
    assert {id(p) for p in model.generator.parameters()} <= rates[round(base, 12)]
    model.set_stage(GENERATION)  # no scales: one plain list, as before stages had them
    assert isinstance(model.optimizer_parameters()[0], torch.nn.Parameter)


def test_a_representation_without_a_group_cannot_train():
    model = tiny_model("representation=clip")
    stage = Stage(name="end_to_end", losses={"generation": 1.0}, trainable=("generator", "representation"), steps=1)
    with pytest.raises(ValueError, match=r"unknown parameter groups \['representation'\].*only a VAE representation can train"):
        model.set_stage(stage)
