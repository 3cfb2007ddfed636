"""The understanding score: generated captions of held-out images parsed against the truth.

Each caption is parsed with the data set's grammar and compared attribute by attribute
with the true caption: which shapes, which colours, how many objects, which spatial
relation, and whether colours are bound to the right shapes. Equivalent phrasings
count as equal ("a red circle and a blue square" = "a blue square and a red circle",
"A above B" = "B below A"). An unparseable caption is wrong on every attribute.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from unizoo.data.captions import PromptSpec, parse_caption

ATTRIBUTES = ("shapes", "colours", "counts", "relation", "binding")
_INVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}


def _objects(spec: PromptSpec) -> Counter:
    """Multiset of (shape, colour) over every object the caption describes."""
    objects = Counter()
    for obj in spec.objects:
        objects[(obj.shape, obj.colour)] += obj.count
    return objects


def _marginal(objects: Counter, index: int) -> Counter:
    """Counts of shapes (index 0) or colours (index 1), ignoring the other attribute."""
    marginal = Counter()
    for key, count in objects.items():
        marginal[key[index]] += count
    return marginal


def _relation(spec: PromptSpec) -> tuple | None:
    """The relation in a canonical direction, so 'A above B' equals 'B below A'."""
    if spec.relation is None:
        return None
    (a, b), relation = spec.objects, spec.relation
    key_a, key_b = (a.shape, a.colour), (b.shape, b.colour)
    if relation in ("below", "right of"):
        key_a, key_b, relation = key_b, key_a, _INVERSE[relation]
    return (relation, key_a, key_b)


def compare_captions(predicted: str, truth: str) -> dict[str, bool]:
    """Attribute-wise correctness of one predicted caption against the true one."""
    true_spec = parse_caption(truth)
    try:
        spec = parse_caption(predicted)
    except ValueError:
        return dict.fromkeys(ATTRIBUTES, False)
    objects, true_objects = _objects(spec), _objects(true_spec)
    return {
        "shapes": _marginal(objects, 0) == _marginal(true_objects, 0),
        "colours": _marginal(objects, 1) == _marginal(true_objects, 1),
        "counts": sum(objects.values()) == sum(true_objects.values()),
        # A relation, or its absence, stated correctly.
        "relation": _relation(spec) == _relation(true_spec),
        "binding": objects == true_objects and _relation(spec) == _relation(true_spec),
    }


def score_captions(predicted: Sequence[str], truth: Sequence[str]) -> dict[str, float]:
    """Accuracy per attribute, `exact` (every attribute right), and `overall` = the mean attribute accuracy."""
    if len(predicted) != len(truth) or not truth:
        raise ValueError(f"need equally many predicted and true captions, got {len(predicted)} and {len(truth)}")
    rows = [compare_captions(p, t) for p, t in zip(predicted, truth)]
    scores = {name: sum(row[name] for row in rows) / len(rows) for name in ATTRIBUTES}
    scores["exact"] = sum(all(row.values()) for row in rows) / len(rows)
    scores["overall"] = sum(scores[name] for name in ATTRIBUTES) / len(ATTRIBUTES)
    scores["n"] = len(rows)
    return scores
