"""VAE representation: patchify round trip, shapes, normalisation (scalar or REPA-E's batch norm), pretraining cache,
local weights, and what a stage that trains it (REPA-E) reads: its differentiable encode and its own loss."""

from __future__ import annotations

import logging

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


def test_pretrained_directory_loads_through_from_pretrained(tmp_path, caplog):
    source = VAERepresentation(autoencoder=TINY)
    torch.nn.init.normal_(source.vae.decoder.conv_out.weight)
    source.vae.register_to_config(scaling_factor=0.5, shift_factor=0.1)
    source.vae.save_pretrained(tmp_path / "vae")
    loaded = VAERepresentation(pretrained=str(tmp_path / "vae"))
    assert torch.equal(loaded.vae.decoder.conv_out.weight, source.vae.decoder.conv_out.weight)
    assert loaded.latent_scale.item() == 0.5 and loaded.latent_shift.item() == pytest.approx(0.1)
    caplog.set_level(logging.INFO)
    loaded.prepare(ShapesDataModule(train_size=16))  # the weights are already real: only a log line
    assert f"representation: using the VAE at {tmp_path / 'vae'} (representation.pretrained)" in caplog.text


def test_missing_pretrained_directory_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        VAERepresentation(pretrained=str(tmp_path / "missing"))


def test_cache_key_is_stable_across_processes():
    keys = cache_keys_in_fresh_processes("vae.VAERepresentation")
    assert len(keys) == 1 and len(keys.pop()) == 16


def batch_norm_vae():
    torch.manual_seed(0)
    return VAERepresentation(autoencoder=TINY, latent_norm="batch")


def test_batch_norm_latents_follow_the_batch_in_training_and_the_running_statistics_otherwise():
    rep = batch_norm_vae()
    images = torch.rand(8, 3, 32, 32) * 2 - 1
    latents = rep.vae.encode(images).latent_dist.mean
    rep.train()
    tokens = rep.encode(images)  # (8, 64, 4): the batch's own statistics, per latent channel
    per_channel = tokens.reshape(-1, 4)
    torch.testing.assert_close(per_channel.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_channel.var(0, unbiased=False), latents.var(dim=(0, 2, 3), unbiased=False)
                               / (latents.var(dim=(0, 2, 3), unbiased=False) + 1e-4), atol=1e-5, rtol=0)
    # The running statistics moved a tenth of the way (momentum 0.1) from their start (0, 1) to the batch's.
    torch.testing.assert_close(rep.batch_norm.running_mean, 0.1 * latents.mean(dim=(0, 2, 3)), atol=1e-6, rtol=0)
    torch.testing.assert_close(rep.batch_norm.running_var, 0.9 + 0.1 * latents.var(dim=(0, 2, 3)), atol=1e-6, rtol=0)
    rep.eval()
    mean, var = rep.batch_norm.running_mean, rep.batch_norm.running_var
    expected = patchify((latents - mean.view(1, -1, 1, 1)) / (var.view(1, -1, 1, 1) + 1e-4).sqrt(), 1)
    torch.testing.assert_close(rep.encode(images), expected, atol=1e-6, rtol=0)
    rep.train()
    # The gradient path reads the running statistics even in training mode, and keeps its graph.
    differentiable = rep.encode_differentiable(images)
    torch.testing.assert_close(differentiable.detach(), expected, atol=1e-6, rtol=0)
    assert differentiable.requires_grad is False  # the VAE is frozen until a stage trains it
    rep.vae.requires_grad_(True)
    assert rep.encode_differentiable(images).requires_grad


def test_decode_undoes_the_batch_norm():
    rep = batch_norm_vae()
    rep.batch_norm.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    rep.batch_norm.running_var.copy_(torch.tensor([4.0, 0.25, 1.0, 9.0]))
    rep.eval()
    latents = torch.randn(2, 4, 8, 8)
    assert torch.allclose(rep._denormalise(rep._normalise(latents)), latents, atol=1e-5)


def test_prepare_starts_the_batch_norm_from_the_latents_statistics(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIZOO_CACHE", str(tmp_path))
    data = ShapesDataModule(train_size=256, batch_size=16)
    rep = VAERepresentation(autoencoder=TINY, pretraining={"steps": 3}, latent_norm="batch")
    rep.prepare(data)
    rep.eval()
    tokens = torch.cat([rep.encode(batch["image"]) for _, batch in zip(range(8), data.train_dataloader())]).reshape(-1, 4)
    torch.testing.assert_close(tokens.mean(0), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(tokens.std(0), torch.ones(4), atol=1e-2, rtol=0)


def test_reconstruction_loss_is_the_pretraining_loss_in_fp32():
    rep = VAERepresentation(autoencoder=TINY, pretraining={"kl_weight": 0.5})
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    torch.manual_seed(3)
    loss = rep.reconstruction_loss(images)
    torch.manual_seed(3)
    posterior = rep.vae.encode(images).latent_dist
    reconstruction = rep.vae.decode(posterior.sample()).sample
    expected = (reconstruction - images).abs().mean() + (reconstruction - images).pow(2).mean() + 0.5 * posterior.kl().mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert rep.reconstruction_loss(images).item() == pytest.approx(loss.item(), abs=0)  # autocast does not reach it


def test_a_vae_names_its_trainable_group_and_a_bad_latent_norm_is_refused():
    rep = VAERepresentation(autoencoder=TINY)
    assert [id(p) for p in rep.parameter_groups()["representation"]] == [id(p) for p in rep.vae.parameters()]
    with pytest.raises(ValueError, match=r"representation.latent_norm='layer'; valid choices: scalar, batch"):
        VAERepresentation(autoencoder=TINY, latent_norm="layer")
