"""Recipes: Hydra composition over the YAML files in `recipes/` (installed as `unizoo.recipes`).

A recipe picks one choice per group (`representation=vae`, `objective=flow_matching`,
...) and sets values (`generator.depth=6`). Mistakes are reported as one paragraph
naming the bad key or choice and listing the valid ones (`RecipeError`), which the
CLI prints without a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from unizoo.errors import RecipeError
from unizoo.runtime.precision import bf16_if_native

# `precision: ${bf16_if_native:${.accelerator}}` in recipes/trainer/cpu.yaml: see unizoo.runtime.precision.
OmegaConf.register_new_resolver("bf16_if_native", bf16_if_native, replace=True)

_ABSENT = object()
STUDIES = "studies"


def recipes_dir() -> Path:
    return Path(str(resources.files("unizoo.recipes")))


def groups() -> dict[str, list[str]]:
    """Each swappable group (a folder of `recipes/`, nested ones as `backbone/vision_encoder`) and its choices.

    `studies/` is not a group: it holds grids of recipes (see `unizoo.studies.study`).
    """
    root = recipes_dir()
    found = {}
    for folder in sorted(p for p in root.rglob("*") if p.is_dir() and p.relative_to(root).parts[0] != STUDIES):
        choices = sorted(p.stem for p in folder.glob("*.yaml"))
        if choices:
            found[folder.relative_to(root).as_posix()] = choices
    return found


def recipe_names() -> list[str]:
    """The named recipes at the root of `recipes/`."""
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def _compose(name: str, overrides: Sequence[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(recipes_dir()), version_base=None, job_name="unizoo"):
        return compose(config_name=name, overrides=list(overrides))


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _explain(name: str, overrides: Sequence[str], error: Exception) -> str:
    """Find the override that broke composition and say what would have been valid."""
    known_groups = groups()
    choices = [o for o in overrides if o.partition("=")[0] in known_groups]
    try:  # diagnose keys against the groups the user chose, not the recipe's defaults
        base = _compose(name, choices)
    except (HydraException, OmegaConfBaseException):
        base = _compose(name, [])
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in known_groups and value not in known_groups[key]:
            choices = known_groups[key]
            return (
                f"unknown {key} {value!r} in override {override!r}.{_did_you_mean(value, choices)} "
                f"Valid choices for {key}: {', '.join(choices)}."
            )
        if override.startswith(("+", "~")) or key in known_groups:
            continue
        if OmegaConf.select(base, key, default=_ABSENT) is _ABSENT:
            # Report the first missing part of the dotted key, at the deepest level that exists.
            parts = key.split(".")
            depth = 0
            while depth < len(parts) - 1 and isinstance(OmegaConf.select(base, ".".join(parts[: depth + 1]), default=None), DictConfig):
                depth += 1
            parent, leaf = ".".join(parts[:depth]), parts[depth]
            scope = OmegaConf.select(base, parent) if parent else base
            valid = sorted(scope.keys())
            where = f"under {parent!r}" if parent else "at the top level"
            return (
                f"unknown recipe key {key!r} in override {override!r}.{_did_you_mean(leaf, valid)} "
                f"Valid keys {where}: {', '.join(map(str, valid)) or '(none)'}. "
                f"Use +{key}=VALUE to add a new key on purpose."
            )
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"recipe {name!r} with overrides {list(overrides)} does not compose: {first_line}"


def compose_recipe(name: str = "default", overrides: Sequence[str] = ()) -> DictConfig:
    """The composed recipe `name` with Hydra-style `overrides` applied."""
    names = recipe_names()
    if name not in names:
        raise RecipeError(f"unknown recipe {name!r}.{_did_you_mean(name, names)} Valid recipes: {', '.join(names)}.")
    try:
        recipe = _compose(name, overrides)
    except (HydraException, OmegaConfBaseException) as error:
        raise RecipeError(_explain(name, overrides, error)) from None
    finally:
        GlobalHydra.instance().clear()
    return recipe


def split_recipe_override(arguments: Sequence[str], default: str = "default") -> tuple[str, list[str]]:
    """Pull `recipe=NAME` out of CLI arguments: (NAME, the other overrides)."""
    name, rest = default, []
    for argument in arguments:
        if argument.startswith("recipe="):
            name = argument.partition("=")[2]
        else:
            rest.append(argument)
    return name, rest
