"""A study: a grid of recipes, as data (`recipes/studies/*.yaml`).

Each axis is a recipe group with its choices (and any extra overrides a choice
needs); a cell picks one choice per axis. A variant is a cell under one seed.
Benchmarks time every cell; `unizoo study` (`unizoo.studies`) trains every variant,
each composing the recipe with the cell's overrides, the study's `common` ones and
`seed=N`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from unizoo.config.composition import STUDIES, recipes_dir

DESIGN_SPACE = recipes_dir() / STUDIES / "design_space.yaml"
# Keys a study file may hold; anything else is a typo worth an error.
STUDY_KEYS = ("recipe", "axes", "common", "seeds", "seeds_for", "overrides_for", "launcher", "throughput")


class StudyError(ValueError):
    """A study name, file or value that is not valid: reported in one paragraph."""


@dataclass(frozen=True)
class Cell:
    """One point of the grid: a choice per axis and the overrides that select it."""

    choices: dict[str, str]
    overrides: tuple[str, ...]

    @property
    def name(self) -> str:
        return "+".join(self.choices.values())


@dataclass(frozen=True)
class Variant:
    """A cell trained under one seed: the unit a study runs, one job each."""

    cell: Cell
    seed: int

    @property
    def name(self) -> str:
        return f"{self.cell.name}-seed{self.seed}"

    @property
    def overrides(self) -> tuple[str, ...]:
        return (*self.cell.overrides, f"seed={self.seed}")


@dataclass(frozen=True)
class Study:
    recipe: str
    axes: dict[str, dict[str, tuple[str, ...]]]  # group -> choice -> the choice's extra overrides
    common: tuple[str, ...] = ()
    throughput: tuple[str, ...] = ()  # overrides of the throughput setting (benchmarks only)
    path: str = ""
    seeds: int = 1  # seeds per cell, unless a `seeds_for` rule says otherwise
    seeds_for: tuple[tuple[dict[str, str], int], ...] = ()  # (choices a cell must have, its seed count); last match wins
    # (choices a cell must have, overrides it gets after its choices'): a value that only fits some cells, such as
    # x0 prediction for the flow-matching cells of one representation
    overrides_for: tuple[tuple[dict[str, str], tuple[str, ...]], ...] = ()
    launcher: dict[str, Any] = field(default_factory=dict)  # defaults of the launcher settings (unizoo.studies.launcher)

    @property
    def name(self) -> str:
        return Path(self.path).stem if self.path else "study"

    def cells(self, select: dict[str, list[str]] | None = None) -> list[Cell]:
        """Every cell in axis order, the last axis varying fastest; ``select`` keeps some choices of an axis."""
        select = select or {}
        per_axis = [[c for c in choices if c in select.get(group, choices)] for group, choices in self.axes.items()]
        cells = []
        for picks in itertools.product(*per_axis):
            overrides = []
            for group, choice in zip(self.axes, picks):
                overrides += [f"{group}={choice}", *self.axes[group][choice]]
            choices = dict(zip(self.axes, picks))
            for where, extra in self.overrides_for:
                if all(choices.get(group) == choice for group, choice in where.items()):
                    overrides += extra
            cells.append(Cell(choices, (*overrides, *self.common)))
        return cells

    def seed_count(self, cell: Cell) -> int:
        count = self.seeds
        for where, seeds in self.seeds_for:
            if all(cell.choices.get(group) == choice for group, choice in where.items()):
                count = seeds
        return count

    def variants(self, select: dict[str, list[str]] | None = None, seeds: int | None = None) -> list[Variant]:
        """Every (cell, seed) to run: seed 0 of every cell first, so a study cut short still covers the grid.

        ``seeds`` replaces the study's seed counts for every cell.
        """
        cells = self.cells(select)
        counts = {cell.name: seeds if seeds is not None else self.seed_count(cell) for cell in cells}
        rounds = max(counts.values(), default=0)
        return [Variant(cell, seed) for seed in range(rounds) for cell in cells if seed < counts[cell.name]]

    def parse_select(self, items: list[str] | tuple[str, ...]) -> dict[str, list[str]]:
        """``["objective=flow_matching", "strategy=joint,sequential"]`` -> ``{axis: [choices]}``, checked."""
        select = {}
        for item in items:
            group, _, value = item.partition("=")
            if group not in self.axes:
                raise StudyError(f"--select {item!r}: no axis {group!r}; axes: {', '.join(self.axes)}")
            choices = [c for c in value.split(",") if c]
            unknown = [c for c in choices if c not in self.axes[group]]
            if not choices or unknown:
                raise StudyError(f"--select {item!r}: choices of {group} are {', '.join(self.axes[group])}")
            select[group] = choices
        return select


def study_names() -> list[str]:
    """The studies shipped under `recipes/studies/`."""
    return sorted(p.stem for p in (recipes_dir() / STUDIES).glob("*.yaml"))


def find_study(name_or_path: str | Path) -> Path:
    """A shipped study's name (``smoke``) or the path of a study file."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise StudyError(f"study file {str(path)!r} does not exist; shipped studies: {', '.join(study_names())}")
        return path
    shipped = recipes_dir() / STUDIES / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise StudyError(
            f"unknown study {str(name_or_path)!r}: give a shipped study ({', '.join(study_names())}) "
            "or the path of a study file (.yaml, see recipes/studies/)"
        )
    return shipped


def _seed_count(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise StudyError(f"{where}: seeds must be a whole number of at least 1, got {value!r}")
    return value


def _where(rule: dict, axes: dict, path: Path, key: str) -> dict[str, str]:
    """A rule's `where:` (axis -> choice), checked against the axes."""
    where = {str(k): str(v) for k, v in (rule.get("where") or {}).items()}
    bad = {g: c for g, c in where.items() if c not in axes.get(g, {})}
    if bad:
        raise StudyError(f"{path}: {key} names {bad}, which is no choice of the axes {({g: list(c) for g, c in axes.items()})}")
    return where


def load_study(path: str | Path = DESIGN_SPACE) -> Study:
    """The grid file (or a shipped study's name) as a :class:`Study`."""
    path = find_study(path)
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(data, dict) or not data.get("axes"):
        raise StudyError(f"{path}: a study needs `axes:`, a list of {{group, choices}} (see recipes/studies/smoke.yaml)")
    unknown = sorted(set(data) - set(STUDY_KEYS))
    if unknown:
        raise StudyError(f"{path}: unknown keys {unknown}; a study file holds {', '.join(STUDY_KEYS)}")
    axes = {
        axis["group"]: {str(choice): tuple(extra or ()) for choice, extra in axis["choices"].items()}
        for axis in data["axes"]
    }
    seeds_for = []
    for rule in data.get("seeds_for") or ():
        where = _where(rule, axes, path, "seeds_for")
        seeds_for.append((where, _seed_count(rule.get("seeds"), f"{path}: seeds_for {where}")))
    overrides_for = []
    for rule in data.get("overrides_for") or ():
        extra = rule.get("overrides")
        if not isinstance(extra, list) or not all(isinstance(o, str) for o in extra):
            raise StudyError(f"{path}: overrides_for needs `overrides:`, a list of KEY=VALUE strings, got {extra!r}")
        overrides_for.append((_where(rule, axes, path, "overrides_for"), tuple(extra)))
    return Study(
        recipe=data.get("recipe", "default"),
        axes=axes,
        common=tuple(data.get("common") or ()),
        throughput=tuple((data.get("throughput") or {}).get("overrides") or ()),
        path=str(path),
        seeds=_seed_count(data.get("seeds", 1), str(path)),
        seeds_for=tuple(seeds_for),
        overrides_for=tuple(overrides_for),
        launcher=dict(data.get("launcher") or {}),
    )
