"""The understanding score: captions parsed against the truth, equivalent phrasings equal."""

from __future__ import annotations

import pytest

from unizoo.data.datamodule import ShapesDataset
from unizoo.eval.understanding import compare_captions, score_captions


def test_true_captions_score_one():
    captions = [ShapesDataset("test", 300).scene(i).caption for i in range(300)]
    scores = score_captions(captions, captions)
    assert scores["overall"] == 1.0 and scores["exact"] == 1.0 and scores["n"] == 300


@pytest.mark.parametrize(
    ("predicted", "truth"),
    [
        ("a blue square and a red circle", "a red circle and a blue square"),
        ("a blue square below a red circle", "a red circle above a blue square"),
        ("a green triangle right of a cyan square", "a cyan square left of a green triangle"),
        ("Two  RED circles", "two red circles"),
    ],
)
def test_equivalent_phrasings_are_equal(predicted, truth):
    assert all(compare_captions(predicted, truth).values())


def test_attributes_fail_independently():
    swapped_colours = compare_captions("a blue circle above a red square", "a red circle above a blue square")
    assert swapped_colours == {"shapes": True, "colours": True, "counts": True, "relation": False, "binding": False}
    wrong_count = compare_captions("two red circles", "three red circles")
    assert wrong_count["counts"] is False and wrong_count["relation"] is True
    wrong_relation = compare_captions("a red circle below a blue square", "a red circle above a blue square")
    assert wrong_relation["shapes"] and wrong_relation["colours"] and not wrong_relation["relation"]


def test_unparseable_caption_is_wrong_everywhere():
    assert not any(compare_captions("purple elephant", "a red circle").values())


def test_shuffled_captions_score_low():
    captions = [ShapesDataset("test", 300).scene(i).caption for i in range(300)]
    scores = score_captions(captions[1:] + captions[:1], captions)
    # Chance: the exact caption almost never repeats; the relation attribute matches
    # whenever both captions lack one (~75% of pairs * 75%), which dominates `overall`.
    assert scores["exact"] < 0.05 and scores["binding"] < 0.05
    assert scores["overall"] < 0.45


def test_lengths_must_match():
    with pytest.raises(ValueError, match="equally many"):
        score_captions(["a red circle"], [])
