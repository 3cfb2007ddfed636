"""A strategy is a list of stages; a stage says what trains, on what, for how long.

Strategies are data, not code paths: the LightningModule reads a `Stage` to set
`requires_grad` per parameter group, weight its losses and split its batches, so
joint, sequential or any new schedule needs no branch in the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Stage:
    """One training stage.

    losses:    loss name -> weight (names the model knows, e.g. "generation").
    trainable: parameter groups that train (e.g. "backbone", "queries", "generator");
               every other group is frozen for the stage.
    mixture:   loss name -> fraction of each batch that feeds it (fractions of one
               batch; a loss missing here gets the whole batch).
    steps:     optimiser steps in this stage.
    learning_rates: trainable group -> multiple of the recipe's learning rate for it
               (a group missing here trains at the recipe's rate).
    """

    name: str
    losses: dict[str, float]
    trainable: tuple[str, ...]
    steps: int
    mixture: dict[str, float] = field(default_factory=dict)
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
