"""Every recipe file in recipes/ composes and instantiates (litgpt's config-hub test)."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger

from image_folder import file_data_overrides, shapes_free
from unizoo.components.strategies.stages import Strategy
from unizoo.config.composition import RecipeError, compose_recipe, groups, recipe_names
from unizoo.training.build import build_model
from unizoo.training.run_loggers import logger_factory

DRAWN_DATA = {"shapes"}  # data choices that need no files
# What a choice needs beyond the tiny sizes (TINY_OVERRIDES build a one-block generator): a LaTtE generator
# splits its blocks into groups (2 by default), and REPA reads block 2 by default.
CHOICE_OVERRIDES = {("generator", "latte_dit"): ["++generator.depth=2"], ("alignment", "repa"): ["alignment.block=1"]}
GROUP_CHOICES = [(group, choice) for group, choices in groups().items() for choice in choices]


def test_recipe_folders_are_the_swappable_groups():
    assert set(groups()) >= {"representation", "objective", "strategy", "generator", "backbone", "data", "trainer"}
    assert "default" in recipe_names()


@pytest.mark.parametrize("name", recipe_names())
def test_every_named_recipe_builds(name, tiny_overrides):
    recipe = compose_recipe(name, tiny_overrides)
    model = build_model(recipe)
    assert model.generator.token_shape == model.representation.token_shape
    assert isinstance(instantiate(recipe.strategy), Strategy)
    datamodule = instantiate(recipe.data)
    assert len(datamodule.prompts("val", 4)) == 4
    assert callable(instantiate(recipe.evaluator))


@pytest.mark.parametrize(("group", "choice"), GROUP_CHOICES)
def test_every_group_choice_builds(group, choice, tiny_overrides, tmp_path):
    overrides = [f"{group}={choice}", *tiny_overrides, *CHOICE_OVERRIDES.get((group, choice), [])]
    if group == "data" and choice not in DRAWN_DATA:  # data read from files: the test writes some
        overrides = [*file_data_overrides(choice, tmp_path), *shapes_free(tiny_overrides)]
    recipe = compose_recipe("default", overrides)
    if group == "trainer":
        trainer = instantiate(recipe.trainer, max_steps=1, logger=False, enable_checkpointing=False)
        assert trainer.max_steps == 1
    elif group == "strategy":
        assert instantiate(recipe.strategy).stages
    elif group == "data":
        data = instantiate(recipe.data)
        data.setup("fit")
        assert len(data.prompts("val", 2)) == 2 and data.skipped() is not None
        assert set(data.vocabulary()) <= set(build_model(recipe).backbone.tokenizer.get_vocab())
    elif group == "logger":
        assert isinstance(logger_factory(recipe)(tmp_path, "generation"), Logger)
    else:
        build_model(recipe)


def test_unknown_group_choice_names_the_valid_ones():
    with pytest.raises(RecipeError) as error:
        compose_recipe("default", ["representation=nope"])
    message = str(error.value)
    assert "'nope'" in message and "representation" in message
    for choice in groups()["representation"]:
        assert choice in message


def test_unknown_key_names_the_valid_keys():
    with pytest.raises(RecipeError) as error:
        compose_recipe("default", ["generator.sise=S"])
    message = str(error.value)
    assert "generator.sise" in message and "Did you mean 'size'" in message and "attention_backend" in message


def test_unknown_recipe_lists_recipes():
    with pytest.raises(RecipeError, match="Valid recipes: .*default"):
        compose_recipe("defualt")


def test_interpolations_resolve():
    recipe = compose_recipe("default", ["data.image_size=64"])
    assert recipe.representation.image_size == 64
