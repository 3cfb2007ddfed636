"""The "shapes" data: sampling GenEval-like scenes (`unizoo.data.scene`) and drawing them.

A scene is 1-3 flat-coloured shapes on a black background. Geometry is sampled
on the integer pixel grid of the requested image size (so drawing is exact, with
no anti-aliasing) and stored image-relative, so a scene can be drawn at any size.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from PIL import Image, ImageDraw

from unizoo.data.captions import caption_for
from unizoo.data.scene import COLOURS, COUNTS, KIND_PROBS, KINDS, RELATIONS, SHAPES, Scene, ShapeObject

_KIND_CDF = np.cumsum(KIND_PROBS)[:-1]  # inverse-CDF sampling: much cheaper than rng.choice(p=...)

# Geometry at the 32 px reference size; everything scales linearly with size.
_REF = 32
_MIN_SIZE, _MAX_SIZE = 8, 13
# 3 px (not the bare minimum of 2) so a slight blur cannot bridge two objects.
_GAP = 3
_BORDER = 1
# Relation scenes: the named axis must dominate the other one by this factor.
_DOMINANCE = 2.0


def _scaled(px: int, image_size: int) -> int:
    return max(1, round(px * image_size / _REF))


def _obj(shape: str, colour: str, x0: int, y0: int, side: int, image_size: int) -> ShapeObject:
    return ShapeObject(shape, colour, (x0 + side / 2) / image_size, (y0 + side / 2) / image_size, side / image_size)


def _random_look(rng: np.random.Generator) -> tuple[str, str]:
    names = list(COLOURS)
    return SHAPES[rng.integers(len(SHAPES))], names[rng.integers(len(names))]


def _two_distinct_looks(rng: np.random.Generator) -> tuple[tuple[str, str], tuple[str, str]]:
    # Two objects must differ in shape or colour, otherwise the caption cannot tell them apart.
    a = _random_look(rng)
    while True:
        b = _random_look(rng)
        if b != a:
            return a, b


def _scatter(
    rng: np.random.Generator, sides: list[int], image_size: int, tries: int = 64
) -> list[tuple[int, int]] | None:
    """Top-left corners for squares of the given sides, pairwise >= gap apart; None if no candidate fits.

    Rejection sampling, vectorised over ``tries`` candidate layouts (one RNG call) for speed.
    """
    gap, border = _scaled(_GAP, image_size), _scaled(_BORDER, image_size)
    s = np.asarray(sides)
    xy = rng.integers(border, (image_size - border - s)[None, :, None] + 1, size=(tries, len(sides), 2))
    ok = np.ones(tries, dtype=bool)
    for i in range(len(sides)):
        for j in range(i + 1, len(sides)):
            a, b = xy[:, i], xy[:, j]
            # Separated along at least one axis: the bboxes (and so the shapes) stay >= gap px apart.
            ok &= ((a >= b + s[j] + gap) | (b >= a + s[i] + gap)).any(axis=1)
    hits = np.flatnonzero(ok)
    if hits.size == 0:
        return None
    return [(int(x), int(y)) for x, y in xy[hits[0]]]


def _place_relation(
    rng: np.random.Generator, sa: int, sb: int, image_size: int
) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """Corners for A and B with B after A along the main axis (B below / right of A after axis choice).

    Returns ``((main_a, cross_a), (main_b, cross_b))`` in pixels along the (main, cross) axes,
    or None if objects this large cannot be that far apart.
    """
    gap, border = _scaled(_GAP, image_size), _scaled(_BORDER, image_size)
    span = image_size - 2 * border
    # Centre-to-centre offset along the main axis: at least what keeps the objects apart,
    # and at least a third of the image so the relation is obvious at a glance.
    lo = max((sa + sb) // 2 + gap + 1, image_size // 3)
    hi = span - (sa + sb) / 2
    if hi < lo:
        return None
    off = int(rng.integers(lo, int(hi) + 1))
    ca = rng.uniform(border + sa / 2, border + span - sb / 2 - off)
    cb = ca + off
    # Cross-axis offset small enough that the main axis dominates.
    max_cross = off / _DOMINANCE - 1
    lo_a = border + sa / 2
    hi_a = border + span - sa / 2
    xa = rng.uniform(lo_a, hi_a)
    lo_b = max(border + sb / 2, xa - max_cross)
    hi_b = min(border + span - sb / 2, xa + max_cross)
    xb = rng.uniform(lo_b, hi_b) if hi_b > lo_b else xa
    corner = lambda c, s: int(np.clip(round(c - s / 2), border, image_size - border - s))  # noqa: E731
    return (corner(ca, sa), corner(xa, sa)), (corner(cb, sb), corner(xb, sb))


def sample_scene(rng: np.random.Generator, image_size: int = 32) -> Scene:
    """Sample one scene (kind drawn from KIND_PROBS) laid out on the ``image_size`` pixel grid."""
    kind = KINDS[int(np.searchsorted(_KIND_CDF, rng.random(), side="right"))]
    lo, hi = _scaled(_MIN_SIZE, image_size), _scaled(_MAX_SIZE, image_size)
    relation = None
    if kind == "relation":
        (sha, cola), (shb, colb) = _two_distinct_looks(rng)
        sa, sb = (int(v) for v in rng.integers(lo, hi + 1, size=2))
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        first_is_a = relation in ("above", "left of")  # else A comes after B along the axis
        while (placed := _place_relation(rng, *((sa, sb) if first_is_a else (sb, sa)), image_size)) is None:
            sa, sb = (sa - 1, sb) if sa >= sb else (sa, sb - 1)  # only at odd image sizes: shrink the larger
        (ma, xa), (mb, xb) = placed if first_is_a else placed[::-1]
        vertical = relation in ("above", "below")
        pa, pb = ((xa, ma), (xb, mb)) if vertical else ((ma, xa), (mb, xb))
        objects = (_obj(sha, cola, *pa, sa, image_size), _obj(shb, colb, *pb, sb, image_size))
    else:
        if kind == "single":
            looks = [_random_look(rng)]
        elif kind == "pair":
            looks = list(_two_distinct_looks(rng))
        else:
            looks = [_random_look(rng)] * int(COUNTS[rng.integers(len(COUNTS))])
        sides = [int(v) for v in rng.integers(lo, hi + 1, size=len(looks))]
        # Three large objects rarely fit with their gaps: shrink the largest until a layout is found.
        while (corners := _scatter(rng, sides, image_size)) is None:
            sides[int(np.argmax(sides))] -= 1
        objects = tuple(_obj(sh, co, x, y, s, image_size) for (sh, co), (x, y), s in zip(looks, corners, sides))
    scene = Scene(kind, objects, "", relation)
    return replace(scene, caption=caption_for(scene))


def draw_scene(scene: Scene, image_size: int = 32) -> Image.Image:
    """Render a scene as an RGB ``image_size`` x ``image_size`` PIL image with exact palette colours."""
    image = Image.new("RGB", (image_size, image_size), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        side = max(2, round(o.size * image_size))
        x0 = round(o.cx * image_size - side / 2)
        y0 = round(o.cy * image_size - side / 2)
        x1, y1 = x0 + side - 1, y0 + side - 1  # PIL boxes are inclusive
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(x0, y1), (x1, y1), (x0 + (side - 1) / 2, y0)], fill=fill)
        else:
            raise ValueError(f"unknown shape {o.shape!r}; expected one of {SHAPES}")
    return image
