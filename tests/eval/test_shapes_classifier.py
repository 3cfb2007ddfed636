"""FID in the features of a classifier of the shapes data's scene labels: labels exact, accuracy real, distances that order."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate

from conftest import TINY_OVERRIDES
from unizoo.config.composition import compose_recipe
from unizoo.data.datamodule import ShapesDataModule
from unizoo.data.scene import Scene, ShapeObject
from unizoo.errors import RecipeError
from unizoo.eval.evaluation import first_items
from unizoo.eval.features import ImageFeatures
from unizoo.eval.frechet import FrechetDistance
from unizoo.eval.sample_statistics import headline_space
from unizoo.eval.shapes_classifier import GRID, PAIRS, ShapesClassifierFeatures, scene_labels
from unizoo.training.build import build_model

# Enough training for features that see shapes, colours and places; a fraction of the shipped schedule.
TRAINING = {"steps": 600, "lr": 3e-3, "batch_size": 32, "train_items": 8000}  # about 20 s


def test_scene_labels_count_each_pair_and_mark_its_cells():
    scene = Scene("count", (ShapeObject("circle", "red", 0.1, 0.1, 0.25), ShapeObject("circle", "red", 0.9, 0.5, 0.25),
                            ShapeObject("square", "blue", 0.5, 0.95, 0.3)), "")
    labels = scene_labels(scene)
    red_circle, blue_square = PAIRS.index(("circle", "red")), PAIRS.index(("square", "blue"))
    expected_counts = torch.zeros(len(PAIRS), dtype=torch.long)
    expected_counts[red_circle], expected_counts[blue_square] = 2, 1
    assert torch.equal(labels["counts"], expected_counts)
    occupied = {(pair, cell) for pair, cell in labels["cells"].nonzero().tolist()}
    # cells row-major on a 3x3 grid: (0.1, 0.1) -> 0, (0.9, 0.5) -> row 1, column 2 -> 5, (0.5, 0.95) -> row 2, column 1 -> 7
    assert occupied == {(red_circle, 0), (red_circle, 1 * GRID + 2), (blue_square, 2 * GRID + 1)}


@pytest.fixture(scope="module")
def classifier():
    data = ShapesDataModule(val_size=1000)
    features = ShapesClassifierFeatures(training=TRAINING)
    features.prepare(data)
    return data, features


def test_the_classifier_learns_the_scenes_far_above_chance(classifier):
    _, features = classifier
    accuracy = features.held_out_accuracy
    assert accuracy["images"] == 1000
    # Every image holds at least one object, so answering "nothing anywhere" gets every pair's count right for
    # no image: 0. A fifth of the shipped schedule already reads all 18 counts right for a fifth of the images.
    assert accuracy["counts"] > 0.15 and accuracy["scene"] <= accuracy["counts"]
    assert features.encode(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 32)


def test_fid_of_real_halves_is_near_zero_and_untrained_samples_far_from_it(classifier):
    data, features = classifier
    extractor = ImageFeatures(features)
    real, captions = first_items(data.val_dataloader(), 1000)
    fid = FrechetDistance(extractor, real[:500])
    halves = fid(real[500:])
    recipe = compose_recipe("default", [*TINY_OVERRIDES, "data.val_size=1000"])
    model = build_model(recipe)
    tiny = instantiate(recipe.data, _convert_="all")
    tiny.setup("fit")
    model.prepare(tiny)
    untrained = fid(model.generate(captions[:500], steps=2))
    noise = fid(torch.rand(500, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert 0 <= halves < 1.0
    assert untrained > 50 * halves and noise > 50 * halves
    assert fid(real[500:]) == pytest.approx(halves)


def test_the_classifier_s_features_need_scene_labels(tmp_path):
    from image_folder import file_data_overrides, shapes_free

    overrides = [*shapes_free(TINY_OVERRIDES), *file_data_overrides("folder", tmp_path)]
    recipe = compose_recipe("default", [*overrides, "evaluation.features=shapes_classifier"])
    data = instantiate(recipe.data, _convert_="all")
    data.setup("fit")
    with pytest.raises(RecipeError, match="evaluation.features=shapes_classifier learns from the shapes data's scene labels"):
        headline_space(recipe, data)
    assert headline_space(compose_recipe("default", overrides), data) == "clip"  # auto: the CLIP features for such data


def test_a_run_records_its_feature_spaces_with_the_classifier_s_accuracy(tiny_overrides, tmp_path):
    from unizoo.cli import main

    assert main(["train", *tiny_overrides, "strategy.steps=2", "evaluation.fid=true"]) == 0
    (run_dir,) = (tmp_path / "runs" / "default").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["features"]["headline"] == "shapes_classifier"
    assert set(metrics["features"]["shapes_classifier"]["held_out_accuracy"]) == {"counts", "cells", "scene", "images"}
    assert metrics["features"]["clip"]["features"] == "CLIPRepresentation"
    for phase in ("untrained", "generation"):
        assert metrics[phase]["fid"] > 0 and metrics[phase]["fid_clip"] > 0
