"""Instantiate a composed recipe's components and wire them into a `UnifiedModel`."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from unizoo.components.conditioning.queries import QueryConditioning
from unizoo.model import UnifiedModel
from unizoo.training.ema import attach_ema


def build_model(recipe: DictConfig) -> UnifiedModel:
    """The model of `recipe`, with random (or `pretrained`) weights; `prepare` makes them real."""
    representation = instantiate(recipe.representation, _convert_="all")
    backbone = instantiate(recipe.backbone, _convert_="all")
    # Recipes from before conditioning was a group (a run's recipe.yaml) read the query tokens, as then.
    conditioning = instantiate(recipe.conditioning, _convert_="all") if OmegaConf.select(recipe, "conditioning") else QueryConditioning()
    num_tokens, token_dim = representation.token_shape
    # The generator's shapes follow from the other components, never from the recipe
    # author: a swapped representation or backbone needs no edit here. The conditioning
    # says how the generator's blocks must read what it hands them (joint attention, ...).
    generator = instantiate(
        recipe.generator, token_dim=token_dim, num_tokens=num_tokens, condition_dim=backbone.hidden_size,
        **conditioning.generator_arguments, _convert_="all",
    )
    # The alignment reads the generator's width, depth and token grid; recipes from before
    # alignments existed have none (= alignment=none).
    alignment = OmegaConf.select(recipe, "alignment")
    model = UnifiedModel(
        representation=representation,
        backbone=backbone,
        generator=generator,
        objective=instantiate(recipe.objective, _convert_="all"),
        optimizer=instantiate(recipe.optimizer, _convert_="all"),
        warmup_steps=recipe.warmup_steps,
        conditioning=conditioning,
        alignment=instantiate(alignment, generator=generator, _convert_="all") if alignment is not None else None,
    )
    attach_ema(model, OmegaConf.select(recipe, "ema.decay"))  # recipes from before EMA have none
    return model
