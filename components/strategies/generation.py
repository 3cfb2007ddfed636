"""Generation only: one stage that trains the backbone, its queries and the generator on text -> image.

The MetaQuery shape of the embedded default, whose tiny LM starts from scratch and so
must learn to read captions; a pretrained, frozen LM is the `sequential` strategy's
second stage.
"""

from __future__ import annotations

from unizoo.components.strategies.stages import Stage, Strategy, UntilFlatSettings, stages_until_flat


def generation(steps: int = 2000, until_flat: UntilFlatSettings | None = None) -> Strategy:
    """`until_flat`: train until the evaluated curve is flat, at most its `max_steps` (then `steps` is unused)."""
    flat = stages_until_flat(until_flat)
    return Strategy(
        name="generation",
        stages=(Stage(name="generation", losses={"generation": 1.0}, trainable=("backbone", "queries", "generator"),
                      steps=flat.max_steps if flat else steps, until_flat=flat),),
    )
