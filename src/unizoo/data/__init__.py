"""The embedded "shapes" data set: scenes, captions, torch data set and Lightning data module."""

from unizoo.data.captions import ObjectSpec, PromptSpec, caption_for, parse_caption, vocabulary
from unizoo.data.shapes import COLOURS, RELATIONS, SHAPES, Scene, ShapeObject, draw_scene, sample_scene

__all__ = [
    "COLOURS", "RELATIONS", "SHAPES", "ObjectSpec", "PromptSpec", "Scene", "ShapeObject", "ShapesDataModule",
    "ShapesDataset", "caption_for", "draw_scene", "parse_caption", "sample_scene", "vocabulary",
]


def __getattr__(name: str):
    # Lazy: the data module pulls in Lightning, which the evaluator and scene code do not need.
    if name in ("ShapesDataset", "ShapesDataModule"):
        from unizoo.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
