"""Verifiers score each (prompt, image): the exact evaluator, and the model's own understanding path."""

from __future__ import annotations

import pytest
import torch

from unizoo.data.datamodule import ShapesDataModule
from unizoo.errors import UsageError
from unizoo.eval.chance import shuffled_prompts
from unizoo.eval.evaluation import first_items
from unizoo.eval.geneval import evaluate
from unizoo.eval.verifiers import SelfVerifier, build_verifier, oracle


@pytest.fixture(scope="module")
def val_items():
    data = ShapesDataModule(val_size=64, batch_size=16)
    data.setup("validate")
    return first_items(data.val_dataloader(), 32)


def test_oracle_passes_real_images_with_their_own_captions(val_items):
    images, captions = val_items
    assert oracle(captions, images).tolist() == [1.0] * 32
    assert oracle(shuffled_prompts(captions), images).mean() < 0.8  # other images' captions: far fewer checks pass


def test_oracle_is_the_share_of_the_prompts_checks(val_items):
    images, captions = val_items
    scores = oracle(["two red circles"] * 4, images[:4])
    for score, image in zip(scores.tolist(), images[:4]):
        single = evaluate(["two red circles"], image[None])
        assert score == (single["counting"] + single["strict_count"]) / 2


def test_self_verification_needs_a_model_that_reads_images():
    class Backbone:
        understands_images = False

    class Model:
        backbone = Backbone()

    with pytest.raises(UsageError, match="reads no images .* strategy=joint or strategy=sequential"):
        SelfVerifier(Model())


def test_unknown_verifier_and_prompts_outside_the_grammar_are_named(val_items):
    with pytest.raises(UsageError, match="valid verifiers: oracle, agreement, self"):
        build_verifier("human", None, None, None)
    verify = build_verifier("oracle", None, None, ShapesDataModule())
    with pytest.raises(UsageError, match="cannot read 'a cat on a sofa'"):
        verify(["a cat on a sofa"], val_items[0][:1])
