"""A strategy is a list of stages; a stage says what trains, on what, for how long.

Strategies are data, not code paths: the LightningModule reads a `Stage` to set
`requires_grad` per parameter group, weight its losses and split its batches, so
joint, sequential or any new schedule needs no branch in the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypedDict


@dataclass(frozen=True)
class UntilFlat:
    """Stop a stage once its evaluated curve has stopped rising (`strategy.until_flat`).

    window:    evaluations (every `evaluation.every_n_steps`) a gain must show up within
    min_gain:  what counts as rising: the best score of the last `window` evaluations beats
               the best before them by at least this much
    max_steps: the stage's length if it never flattens (and the horizon of its LR schedule);
               a stage stopped here while still rising is reported as such, never as a result
    """

    window: int = 3
    min_gain: float = 0.01
    max_steps: int = 8000

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"strategy.until_flat.window={self.window!r}: evaluations, at least 1")
        if not self.min_gain >= 0:
            raise ValueError(f"strategy.until_flat.min_gain={self.min_gain!r}: a score gain of 0 or more")
        if not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"strategy.until_flat.max_steps={self.max_steps!r}: optimiser steps, at least 1")

    def is_flat(self, scores: list[float]) -> bool:
        """Whether a curve of scores (one per evaluation, oldest first) has stopped rising.

        Flat once the best of the last `window` scores beats the best of all earlier ones by
        less than `min_gain`; a curve needs `window` + 1 points before it can be flat.
        """
        if len(scores) <= self.window:
            return False
        before, recent = scores[: -self.window], scores[-self.window :]
        return max(recent) - max(before) < self.min_gain


@dataclass(frozen=True)
class Stage:
    """One training stage.

    losses:    loss name -> weight (names the model knows, e.g. "generation").
    trainable: parameter groups that train (e.g. "backbone", "queries", "generator");
               every other group is frozen for the stage.
    mixture:   loss name -> fraction of each batch that feeds it (fractions of one
               batch; a loss missing here gets the whole batch).
    steps:     optimiser steps in this stage.
    until_flat: stop early once the evaluated curve is flat (then `steps` is its `max_steps`).
    learning_rates: trainable group -> multiple of the recipe's learning rate for it
               (a group missing here trains at the recipe's rate).
    """

    name: str
    losses: dict[str, float]
    trainable: tuple[str, ...]
    steps: int
    mixture: dict[str, float] = field(default_factory=dict)
    until_flat: UntilFlat | None = None
    learning_rates: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"stage {self.name!r}: steps must be >= 1, got {self.steps}")
        if not self.losses:
            raise ValueError(f"stage {self.name!r} names no loss")
        unknown = set(self.mixture) - set(self.losses)
        if unknown:
            raise ValueError(f"stage {self.name!r}: mixture names {sorted(unknown)} that are not among its losses")
        if self.mixture and abs(sum(self.mixture.values()) - 1.0) > 1e-6:
            raise ValueError(f"stage {self.name!r}: mixture fractions must sum to 1, got {self.mixture}")
        untrained = set(self.learning_rates) - set(self.trainable)
        if untrained:
            raise ValueError(f"stage {self.name!r}: learning_rates names {sorted(untrained)}, which it does not train ({', '.join(self.trainable)})")
        if any(scale <= 0 for scale in self.learning_rates.values()):
            raise ValueError(f"stage {self.name!r}: learning-rate scales must be positive, got {self.learning_rates}")


@dataclass(frozen=True)
class Strategy:
    """An ordered list of stages."""

    name: str
    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        names = [stage.name for stage in self.stages]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"strategy {self.name!r} needs at least one stage and unique stage names, got {names}")

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"strategy {self.name!r} has no stage {name!r}; stages: {', '.join(s.name for s in self.stages)}")



class UntilFlatSettings(TypedDict, total=False):
    """`strategy.until_flat` in a recipe: the fields of `UntilFlat`."""

    window: int
    min_gain: float
    max_steps: int


def stages_until_flat(settings: UntilFlatSettings | UntilFlat | None) -> UntilFlat | None:
    """`strategy.until_flat` as a recipe gives it (a mapping, or null) -> `UntilFlat`, or None."""
    if settings is None or isinstance(settings, UntilFlat):
        return settings
    unknown = set(settings) - set(UntilFlatSettings.__annotations__)
    if unknown:
        raise ValueError(f"strategy.until_flat has unknown keys {sorted(unknown)}; valid keys: window, min_gain, max_steps")
    return UntilFlat(**settings)
