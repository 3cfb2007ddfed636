"""The shapes data set: determinism, geometry, caption grammar and the Lightning data module."""

from __future__ import annotations

import gc
import time
import weakref
from collections import Counter

import numpy as np
import pytest
import torch

from unizoo.data.captions import ObjectSpec, PromptSpec, caption_for, parse_caption, vocabulary
from unizoo.data.datamodule import ShapesDataModule, ShapesDataset
from unizoo.data.shapes import COLOURS, KINDS, RELATIONS, SHAPES, Scene, ShapeObject, draw_scene, sample_scene


def _scenes(n: int, image_size: int = 32, split: str = "train") -> list[Scene]:
    ds = ShapesDataset(split, n, image_size)
    return [ds.scene(i) for i in range(n)]


def test_items_are_deterministic_and_random_access():
    a, b = ShapesDataset("train", 100), ShapesDataset("train", 100)
    for i in (0, 7, 99):
        x = a[i]
        assert torch.equal(x["image"], a[i]["image"]) and x["caption"] == a[i]["caption"]
        assert torch.equal(x["image"], b[i]["image"]) and x["caption"] == b[i]["caption"]
    # Reading out of order changes nothing: each item has its own seed.
    assert [a.scene(i) for i in (5, 3, 9)] == [b.scene(i) for i in (9, 3, 5)][::-1]


def test_a_batch_drawn_at_once_equals_its_items_drawn_one_by_one():
    # The loader fetches a batch through __getitems__ (one float conversion for the batch);
    # it must give exactly the items __getitem__ gives, in the sampler's order.
    ds = ShapesDataset("train", 500, image_size=32, seed=3)
    indices = [17, 3, 499, 3, 250]
    batch = ds.__getitems__(indices)
    assert [item["caption"] for item in batch] == [ds[i]["caption"] for i in indices]
    for item, i in zip(batch, indices):
        assert torch.equal(item["image"], ds[i]["image"])
    loaded = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert torch.equal(loaded["image"], torch.stack([ds[i]["image"] for i in range(4)]))


def test_seeds_and_splits_differ():
    caps = {s: [ShapesDataset(s, 50).scene(i).caption for i in range(50)] for s in ("train", "val", "test")}
    assert caps["train"] != caps["val"] != caps["test"] != caps["train"]
    other_seed = [ShapesDataset("train", 50, seed=1).scene(i).caption for i in range(50)]
    assert other_seed != caps["train"]
    with pytest.raises(ValueError):
        ShapesDataset("dev", 10)


@pytest.mark.parametrize("image_size", [32, 64])
def test_image_shape_range_and_exact_palette(image_size):
    ds = ShapesDataset("val", 200, image_size)
    palette = {(0, 0, 0), *COLOURS.values()}
    for i in range(0, 200, 10):
        img = ds[i]["image"]
        assert img.shape == (3, image_size, image_size) and img.dtype == torch.float32
        assert img.min() >= -1.0 and img.max() <= 1.0 and img.min() == -1.0  # black background present
        pixels = ((img + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).reshape(-1, 3)
        # No anti-aliasing: every pixel is exactly black or a palette colour.
        assert {tuple(p) for p in pixels.unique(dim=0).tolist()} <= palette


@pytest.mark.parametrize("image_size", [32, 64])
def test_geometry_sizes_gaps_and_relations(image_size):
    gap = 2 * image_size / 32
    for scene in _scenes(1000, image_size):
        assert 1 <= len(scene.objects) <= 3
        for o in scene.objects:
            side = o.size * image_size
            assert 8 * image_size / 32 - 1e-6 <= side <= 13 * image_size / 32 + 1e-6
            assert 0 <= o.cx - o.size / 2 and o.cx + o.size / 2 <= 1
            assert 0 <= o.cy - o.size / 2 and o.cy + o.size / 2 <= 1
        objs = scene.objects
        for i in range(len(objs)):
            for j in range(i + 1, len(objs)):
                a, b = objs[i], objs[j]
                dx = abs(a.cx - b.cx) * image_size - (a.size + b.size) * image_size / 2
                dy = abs(a.cy - b.cy) * image_size - (a.size + b.size) * image_size / 2
                assert max(dx, dy) >= gap - 1e-6, scene
        if scene.kind in ("pair", "relation"):
            assert (objs[0].shape, objs[0].colour) != (objs[1].shape, objs[1].colour)
        if scene.kind == "count":
            assert len(objs) in (2, 3) and len({(o.shape, o.colour) for o in objs}) == 1
        if scene.kind == "relation":
            a, b = objs
            dx, dy = b.cx - a.cx, b.cy - a.cy  # B minus A
            main, cross = {"above": (dy, dx), "below": (-dy, dx), "left of": (dx, dy), "right of": (-dx, dy)}[
                scene.relation
            ]
            assert main > 0.3 and main > 1.5 * abs(cross), scene


def test_mixture_contains_all_kinds_in_roughly_the_right_proportions():
    kinds = Counter(s.kind for s in _scenes(2000))
    assert set(kinds) == set(KINDS)
    for kind, p in zip(KINDS, (0.3, 0.25, 0.2, 0.25)):
        assert abs(kinds[kind] / 2000 - p) < 0.04, kinds
    relations = Counter(s.relation for s in _scenes(2000) if s.kind == "relation")
    assert set(relations) == set(RELATIONS)


def test_captions_round_trip():
    for scene in _scenes(3000):
        assert scene.caption == caption_for(scene)
        spec = parse_caption(scene.caption)
        assert spec.kind == scene.kind
        if scene.kind == "count":
            o = scene.objects[0]
            assert spec.objects == (ObjectSpec(o.shape, o.colour, len(scene.objects)),)
        else:
            assert spec.objects == tuple(ObjectSpec(o.shape, o.colour, 1) for o in scene.objects)
        assert spec.relation == scene.relation


def test_parse_caption_is_tolerant_but_strict_about_content():
    assert parse_caption("  Three   GREEN triangles ") == PromptSpec("count", (ObjectSpec("triangle", "green", 3),))
    assert parse_caption("a red circle left of a blue square") == PromptSpec(
        "relation", (ObjectSpec("circle", "red"), ObjectSpec("square", "blue")), "left of"
    )
    assert parse_caption("a cyan square and a yellow circle").kind == "pair"
    for bad in ("", "a purple circle", "a red hexagon", "red circle", "a red circle near a blue square",
                "two red circles and a blue square", "a red circle and"):
        with pytest.raises(ValueError, match="parse"):
            parse_caption(bad)


def test_vocabulary_covers_captions():
    vocab = vocabulary()
    assert vocab == sorted(set(vocab))
    words = {w for s in _scenes(2000, split="val") for w in s.caption.split()}
    assert words <= set(vocab)
    # And it is tight: nothing in it that captions never use (checked on enough scenes to see every word).
    assert set(vocab) - words == set()


def test_draw_scene_hand_built():
    scene = Scene("single", (ShapeObject("square", "blue", 0.5, 0.5, 10 / 32),), "a blue square")
    img = np.asarray(draw_scene(scene, 32))
    mask = (img == COLOURS["blue"]).all(-1)
    assert mask.sum() == 100 and mask[11:21, 11:21].all()
    img64 = np.asarray(draw_scene(scene, 64))
    assert (img64 == COLOURS["blue"]).all(-1).sum() == 400  # geometry scales with the image


def test_sampling_speed():
    ds = ShapesDataset("train", 1000)
    ds[0]
    t = time.perf_counter()
    for i in range(500):
        ds[i]
    per_item_ms = (time.perf_counter() - t) / 500 * 1e3
    # ~0.1 ms measured on a 2-core CPU; the bound only catches gross regressions on a busy machine.
    assert per_item_ms < 1.0, per_item_ms


def test_sample_scene_accepts_any_generator():
    scene = sample_scene(np.random.default_rng(123), 64)
    assert scene.kind in KINDS and all(o.shape in SHAPES for o in scene.objects)


def test_datamodule_batches_and_prompts():
    dm = ShapesDataModule(batch_size=16, train_size=100, val_size=40, test_size=20)
    dm.setup("fit")
    train = dm.train_dataloader()
    batch = next(iter(train))
    assert batch["image"].shape == (16, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert isinstance(batch["caption"], list) and all(isinstance(c, str) for c in batch["caption"])
    assert len(train) == 100 // 16  # drop_last
    assert not train.persistent_workers
    # Shuffling is seeded: a fresh loader replays the same order.
    assert next(iter(dm.train_dataloader()))["caption"] == batch["caption"]
    val = list(dm.val_dataloader())
    assert sum(len(b["caption"]) for b in val) == 40 and len(val[-1]["caption"]) == 40 - 32  # no drop, no shuffle
    assert dm.prompts("val", 20) == [dm.datasets["val"].scene(i).caption for i in range(20)]
    assert dm.prompts("val", 20) == val[0]["caption"][:16] + val[1]["caption"][:4]
    assert len(dm.prompts("test", 64)) == 20
    assert dm.vocabulary() == vocabulary()
    assert len(dm.test_dataloader().dataset) == 20


def test_worker_processes_draw_identical_batches():
    dm0 = ShapesDataModule(batch_size=8, val_size=32)
    dm2 = ShapesDataModule(batch_size=8, val_size=32, num_workers=2)
    loader = dm2.val_dataloader()
    assert loader.persistent_workers
    batches0, batches2 = list(dm0.val_dataloader()), list(loader)
    assert len(batches0) == len(batches2) == 4
    for b0, b2 in zip(batches0, batches2):
        assert torch.equal(b0["image"], b2["image"]) and b0["caption"] == b2["caption"]


def test_datamodule_does_not_keep_its_creators_locals_alive():
    # Lightning's default save_hyperparameters() leaves a frame cycle that pins the caller's locals
    # (e.g. a loader with persistent workers, whose late shutdown under gc then stalls for ~10 s).
    class Probe:
        pass

    def make():
        dm, probe = ShapesDataModule(image_size=64), Probe()
        return weakref.ref(dm), weakref.ref(probe), dict(dm.hparams)

    gc.disable()
    try:
        dm_ref, probe_ref, hparams = make()
        assert dm_ref() is None and probe_ref() is None
    finally:
        gc.enable()
    assert hparams["image_size"] == 64 and hparams["train_size"] == 50_000
