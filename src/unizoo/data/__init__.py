"""Data: the embedded "shapes" data set, a user's image folders and WebDataset shards, cached targets.

    scene.py, shapes.py, captions.py   the shapes scene model, its sampler and painter, its caption grammar
    datamodule.py                      the shapes data set and Lightning data module
    folder.py, shards.py               image folders (metadata.jsonl) and tar shards; shard_writer.py writes them
    image_files.py, skips.py           decoding files, and counting the broken ones skipped
    sampler.py, loaders.py             resumable samplers and the loaders built on them
    target_shards.py, with_targets.py  targets encoded once (`unizoo cache-targets`) and read back into batches
    signature.py                       what identifies a data recipe, for the caches keyed by it

The shapes names are handed on here; the data modules load lazily (they pull in Lightning).
"""

from unizoo.data.captions import ObjectSpec, PromptSpec, caption_for, parse_caption, vocabulary
from unizoo.data.scene import COLOURS, RELATIONS, SHAPES, Scene, ShapeObject
from unizoo.data.shapes import draw_scene, sample_scene

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
