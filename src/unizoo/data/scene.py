"""What a "shapes" scene is: its words (shapes, colours, relations, counts) and its objects.

The one place the data's vocabulary is defined: the sampler and painter (`unizoo.data.shapes`),
the caption grammar (`unizoo.data.captions`) and the evaluator's detector all read it here.
"""

from __future__ import annotations

from dataclasses import dataclass

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Six hues 60 degrees apart with identical max/min channel values: nearest-hue
# classification then has the same margin (30 degrees) for every pair, and a
# dimmed or blurred pixel keeps its hue, which makes the evaluator robust.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "yellow": (230, 230, 30),
    "green": (30, 230, 30),
    "cyan": (30, 230, 230),
    "blue": (30, 30, 230),
    "magenta": (230, 30, 230),
}

RELATIONS: tuple[str, ...] = ("above", "below", "left of", "right of")
KINDS: tuple[str, ...] = ("single", "pair", "count", "relation")
KIND_PROBS: tuple[float, ...] = (0.3, 0.25, 0.2, 0.25)
COUNTS: tuple[int, ...] = (2, 3)


@dataclass(frozen=True)
class ShapeObject:
    """One object. ``cx, cy``: bbox centre in [0, 1] (x right, y down); ``size``: bbox side / image side.

    For circles and squares the bbox centre is the centroid; a triangle's centroid
    lies ``size / 6`` below it.
    """

    shape: str
    colour: str
    cx: float
    cy: float
    size: float


@dataclass(frozen=True)
class Scene:
    """``kind`` in KINDS; ``relation`` is set only for kind ``relation`` ("objects[0] <relation> objects[1]")."""

    kind: str
    objects: tuple[ShapeObject, ...]
    caption: str
    relation: str | None = None
