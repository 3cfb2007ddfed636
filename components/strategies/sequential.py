"""Sequential training (BLIP3-o): understanding first, then generation on a frozen backbone.

Stage 1 trains the LM and its image projector on image -> caption. Stage 2 freezes
them and trains only the query tokens and the generator; gradients still flow
through the frozen LM to the queries, so the queries learn to ask the LM for what
the generator needs while the LM's understanding stays exactly as stage 1 left it.
"""

from __future__ import annotations

from unizoo.components.strategies.stages import Stage, Strategy, UntilFlatSettings, stages_until_flat


def sequential(understanding_steps: int = 1000, generation_steps: int = 1500, until_flat: UntilFlatSettings | None = None) -> Strategy:
    """`until_flat`: stage 2 trains until the generation curve is flat, at most its `max_steps` (stage 1 is scored
    by understanding, which the generation evaluator does not see: it keeps `understanding_steps`)."""
    flat = stages_until_flat(until_flat)
    return Strategy(
        name="sequential",
        stages=(
            Stage(name="understanding", losses={"understanding": 1.0}, trainable=("backbone", "projector"), steps=understanding_steps),
            Stage(name="generation", losses={"generation": 1.0}, trainable=("queries", "generator"),
                  steps=flat.max_steps if flat else generation_steps, until_flat=flat),
        ),
    )
