"""Recipe values are checked against the types the components declare, for every group."""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

from unizoo.config.composition import compose_recipe, groups, recipe_names
from unizoo.config.recipe_types import ArgumentsOf, RecipeTypeError, check_recipe_types, describe

# blip3o uses every group but ssl (USED_WITH): a CLIP target with its pixel decoder (and that
# decoder's VAE), and a backbone with a vision encoder. A group choice swapped into it is used too.
BASE = "blip3o"
GROUP_CHOICES = [(group, choice) for group, choices in groups().items() for choice in choices]

# Keys whose declared type takes any string (or anything), so no YAML scalar is wrong by
# type alone; what they accept is checked by the component itself.
TAKES_ANY_SCALAR = {
    "trainer.devices": "list[int] | str | int: 'auto' is a valid value",
    "trainer.val_check_interval": "Lightning also takes a time string",
    "trainer.strategy.find_unused_parameters": "DDPStrategy passes it on through **kwargs: Any",
}
# Choices whose component takes no arguments: nothing of theirs can be of a wrong type.
TAKES_NO_ARGUMENTS = {"conditioning=queries": "QueryConditioning reads the backbone's query states as they are"}

# Groups blip3o does not use, and the overrides under which their values are read.
USED_WITH = {"ssl": ["representation=ssl"]}
# Choices that take no value at all: nothing in them can be of a wrong type.
WITHOUT_VALUES = {("alignment", "none"): "no auxiliary loss: the component has no arguments"}


def leaves(node: DictConfig, path: str):
    """(key, value) of every scalar or list the node sets itself (not through an interpolation)."""
    for key in node.keys():
        child, name = node._get_node(key), f"{path}.{key}"
        if str(key).startswith("_") or child._is_interpolation() or child._is_none():
            continue
        if isinstance(child, DictConfig):
            yield from leaves(child, name)
        else:
            yield name, OmegaConf.to_container(child) if isinstance(child, ListConfig) else child._value()


@pytest.mark.parametrize("name", recipe_names())
def test_every_named_recipe_fits_its_types(name):
    check_recipe_types(compose_recipe(name))


@pytest.mark.parametrize(("group", "choice"), GROUP_CHOICES)
def test_a_wrong_typed_value_in_any_group_is_named(group, choice):
    recipe = compose_recipe(BASE, [f"{group}={choice}", *USED_WITH.get(group, [])])
    check_recipe_types(recipe)  # as written, the recipe fits
    path = group.replace("/", ".")
    checked = 0
    for key, value in leaves(OmegaConf.select(recipe, path), path):
        if key in TAKES_ANY_SCALAR:
            continue
        # A number where a string is set, a word elsewhere; a key that takes both a number and
        # named strings (objective.shift: a float or 'auto') must still refuse some word.
        message = None
        for wrong in ((3, "abc") if isinstance(value, str) else ("abc",)):
            broken = copy.deepcopy(recipe)
            OmegaConf.update(broken, key, wrong, merge=False)
            try:
                check_recipe_types(broken)
            except RecipeTypeError as error:
                message = str(error)
                break
        assert message is not None, f"{key}: no wrong-typed value was refused"
        assert message.startswith(f"{key} must be "), message
        assert f"got {wrong!r}" in message
        assert message.count(" must be ") == 1, message  # named once, where it is set, however often it is used
        checked += 1
    if f"{group}={choice}" in TAKES_NO_ARGUMENTS or (group, choice) in WITHOUT_VALUES:
        assert not checked and set(OmegaConf.select(recipe, path)) == {"_target_"}
        return
    assert checked, f"{group}={choice} sets no value of its own to check"


def test_the_error_names_key_value_and_type_with_the_components_hint():
    with pytest.raises(RecipeTypeError) as error:
        check_recipe_types(compose_recipe("default", ["data.image_size=abc"]))
    assert str(error.value) == "data.image_size must be an integer (32 or 64 for the shapes data), got 'abc'."


def test_an_interpolated_value_is_named_where_it_is_set():
    # representation.pretraining is ${vae.pretraining}: the user sets vae.pretraining.steps.
    with pytest.raises(RecipeTypeError, match=r"^vae\.pretraining\.steps must be an integer, got 'many'\.$"):
        check_recipe_types(compose_recipe("default", ["vae.pretraining.steps=many"]))


def test_nested_arguments_partial_targets_and_factory_kwargs_are_checked():
    overrides = [
        "decoder.generator.aligned_condition=sometimes",  # ArgumentsOf(dit, aligned_condition=bool | 'auto')
        "decoder.training.lr=fast",  # ArgumentsOf(train_pixel_decoder)
        "clip.architecture.vision.hidden_size=wide",  # TypedDict -> ArgumentsOf(CLIPVisionConfig)
        "optimizer.betas=[0.9,high]",  # a _partial_ target: AdamW's tuple[float, float]
        "+generator.depth=deep",  # dit(size, **overrides) -> DiT: checked against DiT
        "trainer.precision=3",  # a Literal
    ]
    with pytest.raises(RecipeTypeError) as error:
        check_recipe_types(compose_recipe("blip3o", overrides))
    message = str(error.value)
    for expected in [
        "decoder.generator.aligned_condition must be true or false or 'auto', got 'sometimes'",
        "decoder.training.lr must be a number, got 'fast'",
        "clip.architecture.vision.hidden_size must be an integer, got 'wide'",
        "optimizer.betas must be a list of 2 values [a number, a number], got [0.9, 'high']",
        "generator.depth must be an integer, got 'deep'",
        "trainer.precision must be one of 64, 32, 16, ",
    ]:
        assert expected in message, message


def test_values_of_the_right_type_pass():
    recipe = compose_recipe("blip3o", ["data.image_size=64", "optimizer.lr=1", "representation.pool_to=16",
                                       "decoder.generator.aligned_condition=false", "trainer.precision=bf16-mixed"])
    check_recipe_types(recipe)  # an int where a float is declared is a number too


def test_type_descriptions():
    assert describe(int | None) == "an integer or null"
    assert describe(Literal["a", "b"] | bool) == "true or false or one of 'a', 'b'"
    assert describe(list[int]) == "a list (each an integer)"
    assert describe(Annotated[dict[str, Any] | None, ArgumentsOf(dict)]) == "a mapping or null"


def test_cli_exits_2_naming_the_key(tiny_overrides, tmp_path, capsys):
    from unizoo.cli import main

    assert main(["train", *tiny_overrides, "data.image_size=abc"]) == 2
    err = capsys.readouterr().err
    assert "data.image_size must be an integer (32 or 64 for the shapes data), got 'abc'" in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing was built or written


def test_the_recipes_own_top_level_values_are_checked():
    with pytest.raises(RecipeTypeError) as error:
        check_recipe_types(compose_recipe("default", ["progress_interval=often", "evaluation.prompts=all"]))
    assert str(error.value) == ("progress_interval must be a number (seconds), got 'often'; "
                                "evaluation.prompts must be an integer of at least 1, got 'all'.")
