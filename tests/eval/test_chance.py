"""Chance levels: real val images scored against other images' prompts."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from unizoo.data.datamodule import ShapesDataModule
from unizoo.eval.chance import CHANCE_IMAGES, CHANCE_SHUFFLES, chance_levels, format_scores, shuffled_prompts
from unizoo.eval.detect import detect_objects
from unizoo.eval.evaluation import first_items
from unizoo.eval.geneval import CATEGORIES, STRICT_CATEGORIES, evaluate, score_prompt

# The default data set's chance levels (32 px, seed 0, the first 1000 val images x 5 shuffles), as
# README.md shows them. If the detector, the scoring rules or the scene sampler change, this test
# fails: re-measure and update both.
DEFAULT_CHANCE = {
    "single_object": 0.443, "two_objects": 0.117, "counting": 0.005, "colors": 0.076, "position": 0.002,
    "color_attr": 0.002, "overall": 0.108,
    "strict_single": 0.015, "strict_pair": 0.002, "strict_count": 0.005, "strict_relation": 0.002,
    "strict_overall": 0.006,
}


@pytest.fixture(scope="module")
def val_items():
    """The first CHANCE_IMAGES val images and captions of the default data set, as a run reads them."""
    datamodule = ShapesDataModule()
    images, captions = first_items(datamodule.val_dataloader(), CHANCE_IMAGES)
    return images, captions


def test_shuffle_moves_every_prompt_to_another_image():
    prompts = [f"prompt {i}" for i in range(100)]
    shuffled = shuffled_prompts(prompts, seed=0)
    assert sorted(shuffled) == sorted(prompts)  # a permutation: every prompt used once
    assert all(a != b for a, b in zip(prompts, shuffled))  # no image keeps its own prompt
    assert shuffled == shuffled_prompts(prompts, seed=0)  # deterministic
    assert shuffled != shuffled_prompts(prompts, seed=1)
    assert shuffled_prompts(["a", "b"], seed=3) == ["b", "a"]
    with pytest.raises(ValueError, match="at least 2"):
        shuffled_prompts(["a red circle"])


def test_default_data_set_chance_levels_as_in_the_readme(val_items):
    images, captions = val_items
    chance = chance_levels(evaluate, captions, images)
    assert chance["n"] == CHANCE_IMAGES * CHANCE_SHUFFLES
    assert {k: round(v, 3) for k, v in chance.items() if k != "n"} == DEFAULT_CHANCE
    # What the strict scores are for: chance reaches a tenth of GenEval overall, but not 0.01 strict.
    assert chance["overall"] >= 0.08 and chance["strict_overall"] <= 0.01


def test_chance_levels_agree_with_the_exact_expectation_within_sampling_error(val_items):
    """On 300 images, the shuffled estimate vs the mean over all 300 x 299 mismatched pairs."""
    images, captions = val_items[0][:300], val_items[1][:300]
    estimate = chance_levels(evaluate, captions, images)
    detections = [detect_objects(image) for image in images]
    hits, pairs = Counter(), Counter()
    for i, prompt in enumerate(captions):
        for j, objects in enumerate(detections):
            if i != j:
                for key, ok in score_prompt(prompt, objects).items():
                    hits[key] += ok
                    pairs[key] += 1
    for key in (*CATEGORIES, *STRICT_CATEGORIES):
        exact = hits[key] / pairs[key]
        n = pairs[key] // (len(captions) - 1) * CHANCE_SHUFFLES  # pairs of this kind in the estimate
        error = np.sqrt(max(exact, 1 / n) * (1 - exact) / n)  # binomial; floored for levels near 0
        assert abs(estimate[key] - exact) <= 3 * error, (key, estimate[key], exact, error)


def test_format_scores_puts_chance_beside_each_score():
    scores = {"single_object": 0.8125, "overall": 0.5, "strict_overall": 0.25, "n": 64}
    assert format_scores(scores, {"single_object": 0.443, "strict_overall": 0.006, "n": 5000}) == (
        "single_object 0.812 (chance 0.443), overall 0.500, strict_overall 0.250 (chance 0.006)"
    )
    assert format_scores(scores) == "single_object 0.812, overall 0.500, strict_overall 0.250"


def test_chance_levels_checks_alignment(val_items):
    images, captions = val_items
    with pytest.raises(ValueError, match="prompts"):
        chance_levels(evaluate, captions[:10], images[:11])
