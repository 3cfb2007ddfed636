"""The caption-image agreement score: torchmetrics' CLIPScore on a local CLIP, checked by hand and on real data."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F
from transformers import CLIPModel

from unizoo.components.representations.clip import CLIPRepresentation
from unizoo.data.datamodule import ShapesDataModule
from unizoo.eval.agreement import CaptionImageAgreement
from unizoo.eval.chance import shuffled_prompts
from unizoo.eval.evaluation import first_items
from unizoo.pretraining.clip import CLIP_MEAN, CLIP_STD, clip_tokenizer, preprocess, save_clip, tiny_clip_config


@pytest.fixture(scope="module")
def random_clip_dir(tmp_path_factory):
    """An untrained tiny CLIP saved as a directory (weights, tokenizer, pixel statistics)."""
    torch.manual_seed(0)
    tokenizer = clip_tokenizer(["a", "red", "blue", "circle", "square"])
    model = CLIPModel(tiny_clip_config(32, tokenizer=tokenizer)).eval()
    directory = tmp_path_factory.mktemp("clip")
    save_clip(model, tokenizer, directory)
    return directory


def test_agreement_is_clipscore_computed_by_hand(random_clip_dir):
    prompts = ["a red circle", "a blue square", "a red square", "unknownword circle"]
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    model = CLIPModel.from_pretrained(random_clip_dir).eval()
    tokenizer = clip_tokenizer(["a", "red", "blue", "circle", "square"])
    with torch.no_grad():
        text = tokenizer(prompts, padding=True, return_tensors="pt")
        text_embeds = model.get_text_features(input_ids=text.input_ids, attention_mask=text.attention_mask).pooler_output
        image_embeds = model.get_image_features(pixel_values=preprocess(images, 32, CLIP_MEAN, CLIP_STD)).pooler_output
    cosines = F.cosine_similarity(image_embeds, text_embeds, dim=-1)
    expected = max(100 * cosines.mean().item(), 0.0)  # torchmetrics floors the mean at 0

    score = CaptionImageAgreement(random_clip_dir)(prompts, images)["agreement"]
    assert score == pytest.approx(expected, abs=1e-4)
    # A list of (3, H, W) images, as chance levels pass them, gives the same score.
    assert CaptionImageAgreement(random_clip_dir)(prompts, list(images))["agreement"] == pytest.approx(score, abs=1e-5)


def test_per_pair_scores_are_the_cosines_whose_mean_is_the_agreement(random_clip_dir):
    prompts = ["a red circle", "a blue square", "a red square", "a blue circle"] * 20  # more than one batch of 64
    images = torch.rand(80, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    agreement = CaptionImageAgreement(random_clip_dir)
    pairs = agreement.per_pair(prompts, images)
    model = CLIPModel.from_pretrained(random_clip_dir).eval()
    tokenizer = clip_tokenizer(["a", "red", "blue", "circle", "square"])
    with torch.no_grad():
        text = tokenizer(prompts[:4], padding=True, return_tensors="pt")
        text_embeds = model.get_text_features(input_ids=text.input_ids, attention_mask=text.attention_mask).pooler_output
        image_embeds = model.get_image_features(pixel_values=preprocess(images[:4], 32, CLIP_MEAN, CLIP_STD)).pooler_output
    assert pairs.shape == (80,)
    torch.testing.assert_close(pairs[:4], 100 * F.cosine_similarity(image_embeds, text_embeds, dim=-1), rtol=0, atol=1e-4)
    assert agreement(prompts, images)["agreement"] == pytest.approx(max(pairs.mean().item(), 0.0), abs=1e-4)


def test_agreement_is_zero_floored_and_bounded(random_clip_dir):
    agreement = CaptionImageAgreement(random_clip_dir)
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    score = agreement(["a red circle"] * 8, images)["agreement"]
    assert 0.0 <= score <= 100.0


def test_agreement_refuses_a_directory_without_a_clip(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluation.agreement.pretrained=.*config.json"):
        CaptionImageAgreement(tmp_path)


def test_agreement_of_real_images_with_own_captions_beats_shuffled_captions(tmp_path, monkeypatch):
    """A tiny CLIP pretrained for 80 steps of 32 (about 10 s) on the shapes data: real images agree more with
    their own captions than with other images' captions, as the run's "real" and "chance" levels say."""
    monkeypatch.setenv("UNIZOO_CACHE", str(tmp_path / "cache"))
    data = ShapesDataModule(batch_size=32, train_size=2560, val_size=256)
    tiny = CLIPRepresentation(image_size=32, pretraining={"steps": 80}, normalize="none")
    directory = tiny.tiny_clip_directory(data)
    assert json.loads((directory / "config.json").read_text())["text_config"]["vocab_size"] > 10  # the text tower is kept
    images, captions = first_items(data.val_dataloader(), 256)
    agreement = CaptionImageAgreement(directory)
    own = agreement(captions, images)["agreement"]
    shuffled = agreement(shuffled_prompts(captions, seed=0), images)["agreement"]
    assert own > shuffled + 5.0, (own, shuffled)
