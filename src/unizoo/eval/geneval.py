"""GenEval-like compositional scoring of (prompt, image) pairs on the shapes domain.

Each prompt counts for the categories of its kind (single -> single_object + colors,
pair -> two_objects + color_attr, count -> counting, relation -> position). ``overall`` is the
mean of the per-category accuracies, as in GenEval, so frequent kinds do not dominate it.

The GenEval categories allow extra objects and ask only that *some* detection matches, which an
image drawn without looking at the prompt often satisfies (three shapes, six colours). Beside
them, each prompt also counts for the strict score of its kind (``strict_single``, ``strict_pair``,
``strict_count``, ``strict_relation``): the image holds exactly the requested objects (shape,
colour, number) and nothing else, and for relations the relation holds as well.
``strict_overall`` is the mean of the strict accuracies.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from unizoo.data.captions import ObjectSpec, PromptSpec, parse_caption
from unizoo.data.scene import KINDS
from unizoo.eval.detect import DetectedObject, detect_objects

CATEGORIES: tuple[str, ...] = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
# Minimum centroid separation (fraction of the image side) along the named axis for a relation
# to hold; small, so any visible offset counts, but bigger than the centroid jitter of blotchy shapes.
POSITION_MARGIN = 0.05
# One strict score per prompt kind: strict_single, strict_pair, strict_count, strict_relation.
STRICT_CATEGORIES: tuple[str, ...] = tuple(f"strict_{kind}" for kind in KINDS)


def _holds(relation: str, a: DetectedObject, b: DetectedObject) -> bool:
    """Whether ``a <relation> b`` holds between centroids (y grows downwards)."""
    if relation == "above":
        return b.cy - a.cy > POSITION_MARGIN
    if relation == "below":
        return a.cy - b.cy > POSITION_MARGIN
    if relation == "left of":
        return b.cx - a.cx > POSITION_MARGIN
    if relation == "right of":
        return a.cx - b.cx > POSITION_MARGIN
    raise ValueError(f"unknown relation {relation!r}")


def _has(objects: list[DetectedObject], wanted: list[ObjectSpec], use_colour: bool) -> bool:
    """Whether every wanted object exists as a *distinct* detection (multiset containment)."""
    key = (lambda o: (o.shape, o.colour)) if use_colour else (lambda o: o.shape)
    have = Counter(key(o) for o in objects)
    need = Counter()
    for spec in wanted:
        need[key(spec)] += spec.count
    return all(have[k] >= n for k, n in need.items())


def _exactly(objects: list[DetectedObject], wanted: list[ObjectSpec]) -> bool:
    """Whether the detections are exactly the wanted objects (shape, colour, number), nothing more."""
    need = Counter()
    for spec in wanted:
        need[(spec.shape, spec.colour)] += spec.count
    return Counter((o.shape, o.colour) for o in objects) == need


def _related(objects: list[DetectedObject], spec: PromptSpec) -> bool:
    """Whether some detection of the first object stands in the prompt's relation to one of the second."""
    sa, sb = spec.objects
    cand_a = [o for o in objects if (o.shape, o.colour) == (sa.shape, sa.colour)]
    cand_b = [o for o in objects if (o.shape, o.colour) == (sb.shape, sb.colour)]
    return any(_holds(spec.relation, a, b) for a in cand_a for b in cand_b if a is not b)


def score_prompt(prompt: str, image) -> dict[str, bool]:
    """Per-category correctness of one image for one prompt: its kind's GenEval categories and strict score.

    ``image``: anything ``detect_objects`` accepts, or an already detected ``list[DetectedObject]``.
    """
    spec = parse_caption(prompt)
    objects = image if isinstance(image, list) else detect_objects(image)
    return {**_geneval(spec, objects), f"strict_{spec.kind}": _strict(spec, objects)}


def _strict(spec: PromptSpec, objects: list[DetectedObject]) -> bool:
    exact = _exactly(objects, list(spec.objects))
    if spec.kind == "relation":
        return exact and _related(objects, spec)
    return exact


def _geneval(spec: PromptSpec, objects: list[DetectedObject]) -> dict[str, bool]:
    wanted = list(spec.objects)
    if spec.kind == "single":
        return {"single_object": _has(objects, wanted, False), "colors": _has(objects, wanted, True)}
    if spec.kind == "pair":
        return {"two_objects": _has(objects, wanted, False), "color_attr": _has(objects, wanted, True)}
    if spec.kind == "count":
        (want,) = spec.objects
        n = sum(o.shape == want.shape and o.colour == want.colour for o in objects)
        return {"counting": n == want.count}
    if spec.kind == "relation":
        return {"position": _related(objects, spec)}
    raise ValueError(f"unknown prompt kind {spec.kind!r}")


def _as_images(images) -> Sequence:
    # A batch tensor [N, 3, H, W] or uint8 array [N, H, W, 3] iterates into single images.
    if isinstance(images, (torch.Tensor, np.ndarray)):
        return list(images)
    return images


def evaluate(prompts: list[str], images) -> dict[str, float]:
    """Accuracy per present category, ``overall`` (mean of those accuracies), the same for the strict
    scores with ``strict_overall``, and ``n`` (number of prompts).

    ``images``: a sequence of images (see ``detect_objects``), a float tensor [N, 3, H, W] in [-1, 1]
    or a uint8 array [N, H, W, 3], aligned with ``prompts``.
    """
    images = _as_images(images)
    if len(prompts) != len(images):
        raise ValueError(f"got {len(prompts)} prompts but {len(images)} images")
    hits: dict[str, list[bool]] = {c: [] for c in (*CATEGORIES, *STRICT_CATEGORIES)}
    for prompt, image in zip(prompts, images):
        for cat, ok in score_prompt(prompt, image).items():
            hits[cat].append(ok)
    result: dict[str, float] = {}
    for categories, overall in ((CATEGORIES, "overall"), (STRICT_CATEGORIES, "strict_overall")):
        scores = {c: float(np.mean(hits[c])) for c in categories if hits[c]}
        result.update(scores, **{overall: float(np.mean(list(scores.values()))) if scores else 0.0})
    result["n"] = len(prompts)
    return result
