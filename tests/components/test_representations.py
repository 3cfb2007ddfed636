"""VAE representation: patchify round trip, shapes, normalisation, pretraining cache, local weights."""

from __future__ import annotations

import pytest
import torch

from conftest import cache_keys_in_fresh_processes
from unizoo.components.representations.vae import VAERepresentation, patchify, unpatchify
from unizoo.data.datamodule import ShapesDataModule

TINY = {"block_out_channels": [16, 16, 16]}


@pytest.mark.parametrize("patch", [1, 2])
def test_patchify_round_trip(patch):
    latents = torch.randn(2, 4, 8, 8)
    tokens = patchify(latents, patch)
    assert tokens.shape == (2, (8 // patch) ** 2, 4 * patch * patch)
    assert torch.equal(unpatchify(tokens, 4, patch), latents)
    # Token 1 is the patch right of token 0 (row-major).
    assert torch.equal(tokens[0, 1].view(4, patch, patch), latents[0, :, :patch, patch : 2 * patch])


@pytest.mark.parametrize(("image_size", "patch", "shape"), [(32, 1, (64, 4)), (64, 2, (64, 16)), (32, 2, (16, 16))])
def test_token_shape_matches_encode(image_size, patch, shape):
    rep = VAERepresentation(image_size=image_size, patch_size=patch, autoencoder=TINY)
    assert rep.token_shape == shape
    tokens = rep.encode(torch.rand(2, 3, image_size, image_size) * 2 - 1)
    assert tokens.shape == (2, *shape)
    images = rep.decode(tokens)
    assert images.shape == (2, 3, image_size, image_size)
    assert images.min() >= -1 and images.max() <= 1


def test_encode_is_frozen_and_deterministic():
    rep = VAERepresentation(autoencoder=TINY)
    rep.train()
    assert not rep.vae.training
    assert not any(p.requires_grad for p in rep.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(rep.encode(x), rep.encode(x))
    assert not rep.encode(x).requires_grad


def test_prepare_pretrains_normalises_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIZOO_CACHE", str(tmp_path))
    data = ShapesDataModule(train_size=256, batch_size=16)
    rep = VAERepresentation(autoencoder=TINY, pretraining={"steps": 30})
    before = rep.vae.decoder.conv_out.weight.clone()
    rep.prepare(data)
    assert not torch.equal(before, rep.vae.decoder.conv_out.weight)
    entries = list((tmp_path / "autoencoder").iterdir())
    assert len(entries) == 1 and (entries[0] / "signature.json").is_file()
    # The fitted normalisation maps real images' latents to unit scale.
    batch = next(iter(data.train_dataloader()))["image"]
    tokens = rep.encode(batch)
    assert 0.5 < tokens.std().item() < 2.0
    assert abs(tokens.mean().item()) < 0.5

    again = VAERepresentation(autoencoder=TINY, pretraining={"steps": 30})
    again.prepare(data)  # from the cache: identical weights, no retraining
    assert torch.equal(again.vae.decoder.conv_out.weight, rep.vae.decoder.conv_out.weight)
    assert again.latent_scale == rep.latent_scale
    assert len(list((tmp_path / "autoencoder").iterdir())) == 1

    different = VAERepresentation(autoencoder=TINY, pretraining={"steps": 31})
    different.prepare(data)  # another recipe, another entry
    assert len(list((tmp_path / "autoencoder").iterdir())) == 2


def test_pretrained_weights_depend_on_the_cache_key_alone(tmp_path, monkeypatch):
    # Two caches, two builds under different global RNG states (as when a recipe builds
    # other models first): the same key must stand for the same weights.
    data = ShapesDataModule(train_size=64, batch_size=16)
    weights = []
    for global_seed in (1, 2):
        monkeypatch.setenv("UNIZOO_CACHE", str(tmp_path / str(global_seed)))
        torch.manual_seed(global_seed)
        rep = VAERepresentation(autoencoder=TINY, pretraining={"steps": 3})
        rep.prepare(data)
        weights.append(rep.vae.state_dict())
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_pretrained_directory_loads_through_from_pretrained(tmp_path):
    source = VAERepresentation(autoencoder=TINY)
    torch.nn.init.normal_(source.vae.decoder.conv_out.weight)
    source.vae.register_to_config(scaling_factor=0.5, shift_factor=0.1)
    source.vae.save_pretrained(tmp_path / "vae")
    loaded = VAERepresentation(pretrained=str(tmp_path / "vae"))
    assert torch.equal(loaded.vae.decoder.conv_out.weight, source.vae.decoder.conv_out.weight)
    assert loaded.latent_scale.item() == 0.5 and loaded.latent_shift.item() == pytest.approx(0.1)
    loaded.prepare(ShapesDataModule(train_size=16))  # a no-op: the weights are already real


def test_missing_pretrained_directory_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        VAERepresentation(pretrained=str(tmp_path / "missing"))


def test_cache_key_is_stable_across_processes():
    keys = cache_keys_in_fresh_processes("vae.VAERepresentation")
    assert len(keys) == 1 and len(keys.pop()) == 16
