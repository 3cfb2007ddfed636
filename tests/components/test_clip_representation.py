"""CLIP representation: token shapes, pooling, frozen encode, local towers, pretraining cache, contrastive learning."""

from __future__ import annotations

import logging

import pytest
import timm
import torch
from torch.nn import functional as F
from transformers import AutoTokenizer, CLIPModel, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from conftest import cache_keys_in_fresh_processes
from unizoo.components.representations.clip import CLIPRepresentation
from unizoo.data.datamodule import ShapesDataModule
from unizoo.pretraining.clip import (
    CLIP_MEAN,
    CLIP_STD,
    clip_tokenizer,
    preprocess,
    retrieval_accuracy,
    save_clip,
    tiny_clip_config,
    train_clip,
)

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
TINY = {"vision": SMALL, "text": SMALL, "projection_dim": 32}
EVA = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize(("pool_to", "shape"), [(None, (64, 32)), (16, (16, 32)), (4, (4, 32)), (1, (1, 32))])
def test_token_shape_matches_encode(pool_to, shape):
    rep = CLIPRepresentation(clip=TINY, pool_to=pool_to)
    assert rep.token_shape == shape
    assert rep.encode(images()).shape == (2, *shape)


def test_default_tower_is_an_8x8_grid_of_64_channels():
    assert CLIPRepresentation().token_shape == (64, 64)


@pytest.mark.parametrize("pool_to", [8, 9, 0])
def test_pool_to_must_be_a_square_dividing_the_grid(pool_to):
    # 8 is not square; 9 = 3x3 does not divide the 8x8 grid.
    with pytest.raises(ValueError, match="square number") as error:
        CLIPRepresentation(clip=TINY, pool_to=pool_to)
    assert "[1, 4, 16, 64]" in str(error.value)


def test_pooling_equals_avg_pool2d_of_the_grid():
    full = CLIPRepresentation(clip=TINY)
    pooled = CLIPRepresentation(clip=TINY, pool_to=16)
    pooled.load_state_dict(full.state_dict())
    x = images()
    tokens = full.encode(x)  # (B, 64, C), row-major over the 8x8 grid
    grid = tokens.transpose(1, 2).reshape(2, 32, 8, 8)
    reference = F.avg_pool2d(grid, 2).reshape(2, 32, 16).transpose(1, 2)
    torch.testing.assert_close(pooled.encode(x), reference)
    # Token 1 of the 4x4 result averages the 2x2 patches right of token 0's.
    torch.testing.assert_close(pooled.encode(x)[:, 1], tokens[:, [2, 3, 10, 11]].mean(1))


def test_encode_is_frozen_and_deterministic():
    rep = CLIPRepresentation(clip={"vision": {**SMALL, "attention_dropout": 0.5}})
    rep.train()
    assert not rep.vision.training
    assert not any(p.requires_grad for p in rep.parameters())
    x = images()
    assert torch.equal(rep.encode(x), rep.encode(x))
    assert not rep.encode(x).requires_grad


def test_encode_drops_cls_and_reads_the_chosen_layer():
    rep = CLIPRepresentation(clip=TINY, feature_layer=-2)
    x = images()
    out = rep.vision(pixel_values=preprocess(x, 32, CLIP_MEAN, CLIP_STD), output_hidden_states=True)
    torch.testing.assert_close(rep.encode(x), out.hidden_states[-2][:, 1:])
    with pytest.raises(ValueError, match="feature_layer"):
        CLIPRepresentation(clip=TINY, feature_layer=5)


def test_saved_vision_tower_loads_back(tmp_path):
    source = CLIPRepresentation(clip=TINY)
    source.vision.save_pretrained(tmp_path / "vision")
    loaded = CLIPRepresentation(pretrained=str(tmp_path / "vision"))
    assert isinstance(loaded.vision, CLIPVisionModel) and loaded.token_shape == (64, 32)
    assert torch.equal(loaded.encode(images()), source.encode(images()))


def test_full_clip_directory_loads_its_vision_tower(tmp_path):
    tokenizer = clip_tokenizer(ShapesDataModule().vocabulary())
    model = CLIPModel(tiny_clip_config(32, TINY, tokenizer)).eval()
    save_clip(model, tokenizer, tmp_path / "clip")
    loaded = CLIPRepresentation(pretrained=str(tmp_path / "clip"), pool_to=4)
    x = images()
    hidden = model.vision_model(pixel_values=preprocess(x, 32, CLIP_MEAN, CLIP_STD)).last_hidden_state[:, 1:]
    reference = F.avg_pool2d(hidden.transpose(1, 2).reshape(2, 32, 8, 8), 4).reshape(2, 32, 4).transpose(1, 2)
    torch.testing.assert_close(loaded.encode(x), reference)


def test_siglip_vision_directory_loads(tmp_path):
    config = SiglipVisionConfig(**SMALL, image_size=64, patch_size=8)
    model = SiglipVisionModel(config).eval()
    model.save_pretrained(tmp_path / "siglip")
    loaded = CLIPRepresentation(pretrained=str(tmp_path / "siglip"))
    assert loaded.token_shape == (64, 32)  # no CLS token: all 8x8 patches
    x = images()  # 32 px images are resized to the tower's 64 px, with SigLIP's 0.5/0.5 statistics
    reference = model(pixel_values=preprocess(x, 64, (0.5,) * 3, (0.5,) * 3)).last_hidden_state
    torch.testing.assert_close(loaded.encode(x), reference)


def test_timm_eva_tower_builds_offline_and_loads_a_local_file(tmp_path):
    rep = CLIPRepresentation(tower="timm", timm_model="eva02_tiny_patch14_224", timm_kwargs=EVA, pool_to=16)
    assert isinstance(rep.vision, timm.models.eva.Eva) and rep.vision.num_prefix_tokens == 1
    assert rep.token_shape == (16, 32) and rep.encode(images()).shape == (2, 16, 32)
    torch.save(rep.vision.state_dict(), tmp_path / "eva.pth")
    for pretrained in (tmp_path / "eva.pth", tmp_path):  # a file, or a directory holding a known name
        if pretrained == tmp_path:
            (tmp_path / "eva.pth").rename(tmp_path / "pytorch_model.bin")
        loaded = CLIPRepresentation(tower="timm", timm_model="eva02_tiny_patch14_224", timm_kwargs=EVA, pretrained=str(pretrained), pool_to=16)
        assert torch.equal(loaded.encode(images()), rep.encode(images()))
    inner = CLIPRepresentation(tower="timm", timm_model="eva02_tiny_patch14_224", timm_kwargs=EVA, feature_layer=-2)
    assert inner.encode(images()).shape == (2, 64, 32)
    with pytest.raises(ValueError, match="pretrained"):
        inner.prepare(ShapesDataModule(train_size=16))  # unizoo pretrains only the transformers tiny CLIP


def test_missing_pretrained_path_says_how_to_make_one(tmp_path):
    missing = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="save_pretrained") as error:
        CLIPRepresentation(pretrained=missing)
    assert missing in str(error.value)
    with pytest.raises(FileNotFoundError, match=missing):
        CLIPRepresentation(tower="timm", timm_model="eva02_tiny_patch14_224", pretrained=missing)


def test_decode_needs_a_trained_decoder():
    rep = CLIPRepresentation(clip=TINY)
    with pytest.raises(RuntimeError, match="representation.decoder"):
        rep.decode(torch.zeros(1, 64, 32))


def test_prepare_pretrains_normalises_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIZOO_CACHE", str(tmp_path))
    data = ShapesDataModule(train_size=256, batch_size=16)
    rep = CLIPRepresentation(clip=TINY, pretraining={"steps": 3})
    before = rep.vision.embeddings.patch_embedding.weight.clone()
    rep.prepare(data)
    assert not torch.equal(before, rep.vision.embeddings.patch_embedding.weight)
    entries = list((tmp_path / "clip").iterdir())
    assert len(entries) == 1 and (entries[0] / "signature.json").is_file()
    # A complete CLIP: both towers and the tokenizer load back.
    assert isinstance(CLIPModel.from_pretrained(entries[0]), CLIPModel)
    tokenizer = AutoTokenizer.from_pretrained(entries[0])
    assert tokenizer("a red circle").input_ids[-1] == tokenizer.eos_token_id  # CLIP pools at <eos>
    # The fitted normalisation maps real (held-out) images' features to unit scale.
    tokens = rep.encode(next(iter(data.val_dataloader()))["image"])
    assert 0.8 < tokens.std().item() < 1.25 and abs(tokens.mean().item()) < 0.2

    again = CLIPRepresentation(clip=TINY, pretraining={"steps": 3})
    again.prepare(data)  # from the cache: identical weights and normalisation, no retraining
    assert torch.equal(again.vision.embeddings.patch_embedding.weight, rep.vision.embeddings.patch_embedding.weight)
    assert torch.equal(again.feature_scale, rep.feature_scale) and torch.equal(again.feature_shift, rep.feature_shift)
    assert len(list((tmp_path / "clip").iterdir())) == 1

    CLIPRepresentation(clip=TINY, pretraining={"steps": 4}).prepare(data)  # another recipe, another entry
    assert len(list((tmp_path / "clip").iterdir())) == 2


def test_pretrained_tower_only_fits_the_normalisation(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("UNIZOO_CACHE", str(tmp_path / "cache"))
    CLIPRepresentation(clip=TINY).vision.save_pretrained(tmp_path / "vision")
    rep = CLIPRepresentation(pretrained=str(tmp_path / "vision"), normalize=True)
    weights = rep.vision.embeddings.patch_embedding.weight.clone()
    caplog.set_level(logging.INFO)
    rep.prepare(ShapesDataModule(train_size=128, batch_size=16))
    assert torch.equal(weights, rep.vision.embeddings.patch_embedding.weight)
    assert f"representation: using the transformers vision tower at {tmp_path / 'vision'}" in caplog.text
    assert not (tmp_path / "cache").exists()  # nothing pretrained
    assert rep.normalize == "scalar" and rep.feature_scale != 1.0  # true: a recipe from before per-channel statistics
    raw = CLIPRepresentation(pretrained=str(tmp_path / "vision"), normalize=False)
    raw.prepare(ShapesDataModule(train_size=128, batch_size=16))
    assert raw.normalize == "none" and raw.feature_shift == 0.0 and raw.feature_scale == 1.0


def test_channel_normalisation_gives_every_channel_zero_mean_and_unit_std(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIZOO_CACHE", str(tmp_path / "cache"))
    CLIPRepresentation(clip=TINY).vision.save_pretrained(tmp_path / "vision")
    data = ShapesDataModule(train_size=512, batch_size=64)
    per_channel = CLIPRepresentation(pretrained=str(tmp_path / "vision"), normalize="channel")
    scalar = CLIPRepresentation(pretrained=str(tmp_path / "vision"), normalize="scalar")
    per_channel.prepare(data)
    scalar.prepare(data)
    width = per_channel.width
    assert per_channel.feature_scale.shape == (width,) and scalar.feature_scale.shape == ()
    images = torch.cat([batch["image"] for batch in data.train_dataloader()])[:512]  # the images it was fitted on
    channels = per_channel.encode(images).reshape(-1, width)
    assert channels.mean(0).abs().max() < 1e-3
    assert torch.allclose(channels.std(0), torch.ones(width), atol=1e-3)
    # A scalar normalisation leaves the channels' relative sizes: their stds spread out.
    spread = scalar.encode(images).reshape(-1, width).std(0)
    assert spread.max() / spread.min() > 1.5
    # The same features up to a per-channel affine map.
    assert torch.allclose(per_channel.encode(images[:8]), (scalar.encode(images[:8]) / scalar.feature_scale + scalar.feature_shift
                                                           - per_channel.feature_shift) * per_channel.feature_scale, atol=1e-4)


def test_unknown_normalisation_names_the_choices():
    with pytest.raises(ValueError, match="channel, scalar, none"):
        CLIPRepresentation(clip=TINY, normalize="layer")


def test_cache_key_is_stable_across_processes():
    keys = cache_keys_in_fresh_processes("clip.CLIPRepresentation")
    assert len(keys) == 1 and len(keys.pop()) == 16


def test_short_contrastive_pretraining_retrieves_captions_above_chance():
    torch.manual_seed(0)
    data = ShapesDataModule(batch_size=32)
    tokenizer = clip_tokenizer(data.vocabulary())
    model = CLIPModel(tiny_clip_config(32, TINY, tokenizer))
    untrained = retrieval_accuracy(model, tokenizer, data.dataset("val"), size=200)
    train_clip(model, tokenizer, data.train_dataloader(), steps=80, lr=2e-3, seed=0)
    scores = retrieval_accuracy(model, tokenizer, data.dataset("val"), size=200)
    # Each of the 200 val images is classified among their 148 distinct captions: chance
    # is 0.7%, always answering the most frequent caption scores 3%; this reaches ~13%.
    assert scores["chance"] < 0.02 and scores["majority"] < 0.05
    assert scores["accuracy"] > max(10 * scores["chance"], 2 * scores["majority"], 2 * untrained["accuracy"])


@pytest.mark.parametrize(("pool_to", "aligned"), [(None, True), (16, False)])
def test_pixel_decoder_aligns_features_only_on_the_latent_grid(pool_to, aligned):
    # 32 px: CLIP's 8x8 patch grid sits on the VAE's 8x8 latent grid; pooled features do not.
    rep = CLIPRepresentation(pool_to=pool_to, decoder={"vae": {"autoencoder": {"block_out_channels": [16, 16, 16]}}})
    assert rep.decoder.generator.aligned_condition is aligned
    images = rep.decode(rep.encode(torch.rand(2, 3, 32, 32) * 2 - 1))
    assert images.shape == (2, 3, 32, 32)
