"""Joint training: understanding and generation losses together, on mixed batches (one stage).

Every trainable group learns from both tasks at once; the backbone is shared, so the
two losses compete for it (the MetaMorph / Janus recipe).
"""

from __future__ import annotations

from unizoo.components.strategies.stages import Stage, Strategy, UntilFlatSettings, stages_until_flat


def joint(
    steps: int = 2000,
    generation_weight: float = 1.0,
    understanding_weight: float = 1.0,
    generation_fraction: float = 0.5,
    until_flat: UntilFlatSettings | None = None,
) -> Strategy:
    """`until_flat`: train until the evaluated generation curve is flat, at most its `max_steps`."""
    flat = stages_until_flat(until_flat)
    return Strategy(
        name="joint",
        stages=(
            Stage(
                name="joint",
                losses={"generation": generation_weight, "understanding": understanding_weight},
                trainable=("backbone", "projector", "queries", "generator"),
                mixture={"generation": generation_fraction, "understanding": 1.0 - generation_fraction},
                steps=flat.max_steps if flat else steps,
                until_flat=flat,
            ),
        ),
    )
