"""A study: a grid of recipes, as data (`recipes/studies/*.yaml`).

Each axis is a recipe group with its choices (and any extra overrides a choice
needs); a cell picks one choice per axis. Benchmarks time every cell, and a study
runner trains every cell, each composing the recipe with the cell's overrides.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from unizoo.composition import recipes_dir

DESIGN_SPACE = recipes_dir() / "studies" / "design_space.yaml"


@dataclass(frozen=True)
class Cell:
    """One point of the grid: a choice per axis and the overrides that select it."""

    choices: dict[str, str]
    overrides: tuple[str, ...]

    @property
    def name(self) -> str:
        return "+".join(self.choices.values())


@dataclass(frozen=True)
class Study:
    recipe: str
    axes: dict[str, dict[str, tuple[str, ...]]]  # group -> choice -> the choice's extra overrides
    common: tuple[str, ...] = ()
    throughput: tuple[str, ...] = ()  # overrides of the throughput setting (benchmarks only)
    path: str = ""

    def cells(self, select: dict[str, list[str]] | None = None) -> list[Cell]:
        """Every cell in axis order, the last axis varying fastest; ``select`` keeps some choices of an axis."""
        select = select or {}
        per_axis = [[c for c in choices if c in select.get(group, choices)] for group, choices in self.axes.items()]
        cells = []
        for picks in itertools.product(*per_axis):
            overrides = []
            for group, choice in zip(self.axes, picks):
                overrides += [f"{group}={choice}", *self.axes[group][choice]]
            cells.append(Cell(dict(zip(self.axes, picks)), (*overrides, *self.common)))
        return cells

    def parse_select(self, items: list[str] | tuple[str, ...]) -> dict[str, list[str]]:
        """``["objective=flow_matching", "strategy=joint,sequential"]`` -> ``{axis: [choices]}``, checked."""
        select = {}
        for item in items:
            group, _, value = item.partition("=")
            if group not in self.axes:
                raise ValueError(f"--select {item!r}: no axis {group!r}; axes: {', '.join(self.axes)}")
            choices = [c for c in value.split(",") if c]
            unknown = [c for c in choices if c not in self.axes[group]]
            if not choices or unknown:
                raise ValueError(f"--select {item!r}: choices of {group} are {', '.join(self.axes[group])}")
            select[group] = choices
        return select


def load_study(path: str | Path = DESIGN_SPACE) -> Study:
    """The grid file as a :class:`Study`."""
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    axes = {
        axis["group"]: {str(choice): tuple(extra or ()) for choice, extra in axis["choices"].items()}
        for axis in data["axes"]
    }
    return Study(
        recipe=data.get("recipe", "default"),
        axes=axes,
        common=tuple(data.get("common") or ()),
        throughput=tuple((data.get("throughput") or {}).get("overrides") or ()),
        path=str(path),
    )
