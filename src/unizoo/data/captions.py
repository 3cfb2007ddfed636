"""Caption grammar of the shapes data set: scene -> caption, and caption -> structured prompt spec.

Grammar (lower case, single spaces once normalised)::

    caption  := phrase                      # kind "single" (determiner a/an) or "count" (number word)
              | phrase "and" phrase         # kind "pair"
              | phrase RELATION phrase      # kind "relation"; RELATION in above/below/left of/right of
    phrase   := ("a" | "an" | NUMBER) COLOUR SHAPE["s"]
"""

from __future__ import annotations

from dataclasses import dataclass

from unizoo.data.scene import COLOURS, COUNTS, RELATIONS, SHAPES, Scene

_NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9}
_WORD_OF = {v: k for k, v in _NUMBER_WORDS.items()}
_PLURAL = {s: s + "s" for s in SHAPES}
_SHAPE_OF = {**{s: s for s in SHAPES}, **{p: s for s, p in _PLURAL.items()}}


@dataclass(frozen=True)
class ObjectSpec:
    """One requested object group: ``count`` objects of this shape and colour."""

    shape: str
    colour: str
    count: int = 1


@dataclass(frozen=True)
class PromptSpec:
    """Parsed caption. ``objects``: 1 spec (single/count) or 2 (pair/relation); ``relation`` only for kind relation."""

    kind: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None


def _phrase(shape: str, colour: str, count: int = 1) -> str:
    if count == 1:
        return f"a {colour} {shape}"
    return f"{_WORD_OF[count]} {colour} {_PLURAL[shape]}"


def caption_for(scene: Scene) -> str:
    """The caption of a scene; uses only ``kind``, ``objects`` and ``relation`` (not ``scene.caption``)."""
    objs = scene.objects
    if scene.kind == "single":
        return _phrase(objs[0].shape, objs[0].colour)
    if scene.kind == "count":
        return _phrase(objs[0].shape, objs[0].colour, len(objs))
    a, b = _phrase(objs[0].shape, objs[0].colour), _phrase(objs[1].shape, objs[1].colour)
    if scene.kind == "pair":
        return f"{a} and {b}"
    if scene.kind == "relation":
        if scene.relation not in RELATIONS:
            raise ValueError(f"relation scene needs a relation in {RELATIONS}, got {scene.relation!r}")
        return f"{a} {scene.relation} {b}"
    raise ValueError(f"unknown scene kind {scene.kind!r}")


def _parse_phrase(words: list[str], text: str) -> ObjectSpec:
    if len(words) != 3:
        raise ValueError(f"cannot parse {text!r}: expected '<a|number> <colour> <shape>', got {' '.join(words)!r}")
    det, colour, noun = words
    if det in ("a", "an"):
        count = 1
    elif det in _NUMBER_WORDS:
        count = _NUMBER_WORDS[det]
    else:
        raise ValueError(f"cannot parse {text!r}: {det!r} is not 'a', 'an' or a number word")
    if colour not in COLOURS:
        raise ValueError(f"cannot parse {text!r}: unknown colour {colour!r} (known: {', '.join(COLOURS)})")
    if noun not in _SHAPE_OF:
        raise ValueError(f"cannot parse {text!r}: unknown shape {noun!r} (known: {', '.join(SHAPES)})")
    return ObjectSpec(_SHAPE_OF[noun], colour, count)


def parse_caption(text: str) -> PromptSpec:
    """Parse a caption (case/whitespace-insensitive, plurals accepted); ValueError if it is not in the grammar."""
    words = text.lower().split()
    if not words:
        raise ValueError("cannot parse an empty caption")
    if len(words) <= 3:
        spec = _parse_phrase(words, text)
        return PromptSpec("single" if spec.count == 1 and words[0] in ("a", "an") else "count", (spec,))
    # Two phrases joined by a connective of one or two words ("and", "above", "left of", ...).
    for connective in ("and", *RELATIONS):
        n = len(connective.split())
        if words[3 : 3 + n] == connective.split() and len(words) == 6 + n:
            a, b = _parse_phrase(words[:3], text), _parse_phrase(words[3 + n :], text)
            if a.count != 1 or b.count != 1:
                raise ValueError(f"cannot parse {text!r}: counts are only supported in single-phrase captions")
            kind = "pair" if connective == "and" else "relation"
            return PromptSpec(kind, (a, b), None if kind == "pair" else connective)
    raise ValueError(
        f"cannot parse {text!r}: expected '<phrase>', '<phrase> and <phrase>' or '<phrase> <relation> <phrase>' "
        f"with relation in {RELATIONS}"
    )


def vocabulary() -> list[str]:
    """Every word a data-set caption can contain, sorted (for a word-level tokenizer)."""
    words = {"a", "and", *COLOURS, *SHAPES, *_PLURAL.values(), *(_WORD_OF[c] for c in COUNTS)}
    for rel in RELATIONS:
        words.update(rel.split())
    return sorted(words)
