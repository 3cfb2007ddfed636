"""FID in the tiny CLIP's feature space, and sample diversity: numbers that order what they should."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from conftest import TINY_OVERRIDES
from unizoo.config.composition import compose_recipe
from unizoo.eval.diversity import SampleDiversity, mean_pairwise_distance
from unizoo.eval.evaluation import first_items
from unizoo.eval.features import image_features
from unizoo.eval.frechet import FrechetDistance
from unizoo.training.build import build_model


@pytest.fixture(scope="module")
def shapes():
    recipe = compose_recipe("default", [*TINY_OVERRIDES, "data.val_size=256"])
    datamodule = instantiate(recipe.data, _convert_="all")
    datamodule.setup("fit")
    return recipe, datamodule, image_features(recipe.evaluation.feature_spaces.clip, datamodule)


def test_features_are_one_vector_per_image(shapes):
    recipe, datamodule, features = shapes
    images, _ = first_items(datamodule.val_dataloader(), 5)
    out = features(images)
    assert out.shape == (5, features.num_features) == (5, recipe.clip.architecture.vision.hidden_size)
    assert torch.equal(out, features(images))  # frozen, deterministic


def test_fid_of_real_halves_is_far_below_untrained_samples(shapes):
    recipe, datamodule, features = shapes
    real, captions = first_items(datamodule.val_dataloader(), 256)
    fid = FrechetDistance(features, real[:128])
    halves = fid(real[128:])
    model = build_model(recipe)
    model.prepare(datamodule)
    untrained = fid(model.generate(captions[:128], steps=2))
    noise = fid(torch.rand(128, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert 0 <= halves < 1.0
    assert halves < 0.05 * untrained and halves < 0.05 * noise
    assert fid(real[128:]) == pytest.approx(halves)  # the real statistics are kept across calls


def test_mean_pairwise_distance_is_exact():
    assert mean_pairwise_distance(torch.tensor([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(math.sqrt(2))
    # Normalised first: scale does not count. Pairs: 0, sqrt 2, sqrt 2.
    assert mean_pairwise_distance(torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])) == pytest.approx(2 * math.sqrt(2) / 3)
    assert mean_pairwise_distance(torch.ones(4, 8)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="at least 2 samples"):
        mean_pairwise_distance(torch.ones(1, 8))


def test_diversity_is_zero_for_a_sampler_that_ignores_noise_and_positive_otherwise(shapes):
    _, datamodule, features = shapes
    prompts = datamodule.prompts("val", 3)
    real, _ = first_items(datamodule.val_dataloader(), 3)
    diversity = SampleDiversity(prompts, samples=4, features=features)
    by_prompt = {prompt: image for prompt, image in zip(prompts, real)}

    def collapsed(batch, seed):  # the same image for every draw of a prompt, as an MSE regression draws
        return torch.stack([by_prompt[p] for p in batch])

    def noisy(batch, seed):
        return torch.rand(len(batch), 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1

    assert diversity(collapsed) == pytest.approx(0.0, abs=1e-6)
    assert diversity(noisy) > 0.01
