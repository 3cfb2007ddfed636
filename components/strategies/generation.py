"""Generation only: one stage that trains the backbone, its queries and the generator on text -> image.

The MetaQuery shape of the embedded default, whose tiny LM starts from scratch and so
must learn to read captions; a pretrained, frozen LM is the `sequential` strategy's
second stage.
"""

from __future__ import annotations

from unizoo.components.strategies.stages import Stage, Strategy


def generation(steps: int = 2000) -> Strategy:
    return Strategy(
        name="generation",
        stages=(Stage(name="generation", losses={"generation": 1.0}, trainable=("backbone", "queries", "generator"), steps=steps),),
    )
