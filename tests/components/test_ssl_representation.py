"""The SSL representation: the tiny MAE's pretraining, its cache, its features, and that it stays frozen while a run trains."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from conftest import TINY_OVERRIDES, cache_keys_in_fresh_processes
from unizoo.components.representations.ssl import SSLRepresentation
from unizoo.config.composition import compose_recipe
from unizoo.data.datamodule import ShapesDataModule
from unizoo.pretraining.mae import TinyMAE, patchify_images, sincos_2d, train_mae
from unizoo.training.build import build_model
from unizoo.training.train import train

SMALL = {"num_layers": 1, "decoder_layers": 1}


def test_patches_are_row_major_and_positions_distinct():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    patches = patchify_images(images, 4)
    assert patches.shape == (2, 4, 48)
    # Patch 1 is the top-right 4x4 block, pixels row-major with the 3 channels innermost.
    assert torch.equal(patches[0, 1].view(4, 4, 3).permute(2, 0, 1), images[0, :, :4, 4:])
    positions = sincos_2d(8, 64)
    assert positions.shape == (64, 64) and torch.unique(positions, dim=0).shape[0] == 64


def test_the_loss_reads_only_the_masked_patches():
    torch.manual_seed(0)
    mae = TinyMAE(32, SMALL)
    mae.encoder.patch_embed.weight.data.zero_()  # the predictions no longer depend on the pixels: only the targets do
    images = torch.rand(2, 3, 32, 32) * 2 - 1

    def loss(x):
        torch.manual_seed(1)  # the loss's own draw of which patches are masked
        return mae.loss(x).item()

    torch.manual_seed(1)
    order = torch.rand(2, 64).argsort(dim=1)  # that draw: the first 16 of each order are visible
    visible, masked = order[:, :16], order[:, 16:]

    def flattened(indices):
        x = images.clone()
        for b in range(2):
            for index in indices[b].tolist():
                row, col = divmod(index, 8)
                x[b, :, row * 4:(row + 1) * 4, col * 4:(col + 1) * 4] = 0.3
        return x

    assert loss(flattened(visible)) == pytest.approx(loss(images), abs=1e-7)
    assert loss(flattened(masked[:, :1])) != pytest.approx(loss(images), abs=1e-4)


def test_pretraining_lowers_the_masked_patch_loss():
    data = ShapesDataModule(train_size=256, batch_size=32)
    data.setup("fit")
    torch.manual_seed(0)
    mae = TinyMAE(32)
    images = next(iter(data.train_dataloader()))["image"]

    def held_out_loss():
        torch.manual_seed(5)
        with torch.no_grad():
            return mae.loss(images).item()

    before = held_out_loss()
    train_mae(mae, data.train_dataloader(), steps=60, lr=2e-3, warmup_steps=5)
    after = held_out_loss()
    assert after < 0.75 * before, (before, after)


def test_prepare_pretrains_caches_and_normalises(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIZOO_CACHE", str(tmp_path))
    data = ShapesDataModule(train_size=256, batch_size=16)
    rep = SSLRepresentation(architecture=SMALL, pretraining={"steps": 5})
    before = rep.encoder.patch_embed.weight.clone()
    rep.prepare(data)
    assert not torch.equal(before, rep.encoder.patch_embed.weight)
    entries = list((tmp_path / "ssl_mae").iterdir())
    assert len(entries) == 1 and (entries[0] / "signature.json").is_file()
    again = SSLRepresentation(architecture=SMALL, pretraining={"steps": 5})
    again.prepare(data)  # from the cache
    assert torch.equal(again.encoder.patch_embed.weight, rep.encoder.patch_embed.weight)
    assert len(list((tmp_path / "ssl_mae").iterdir())) == 1
    tokens = torch.cat([rep.encode(batch["image"]) for _, batch in zip(range(8), data.train_dataloader())]).reshape(-1, 64)
    torch.testing.assert_close(tokens.mean(0), torch.zeros(64), atol=1e-4, rtol=0)
    torch.testing.assert_close(tokens.std(0), torch.ones(64), atol=1e-3, rtol=0)


def test_features_have_clips_shape_and_do_not_decode_without_a_decoder():
    rep = SSLRepresentation()
    assert rep.token_shape == (64, 64)
    assert rep.encode(torch.rand(2, 3, 32, 32) * 2 - 1).shape == (2, 64, 64)
    assert rep.parameter_groups() == {}
    with pytest.raises(RuntimeError, match="pixel decoder"):
        rep.decode(torch.zeros(1, 64, 64))


def test_cache_key_is_stable_across_processes():
    keys = cache_keys_in_fresh_processes("ssl.SSLRepresentation")
    assert len(keys) == 1 and len(keys.pop()) == 16


def test_the_ssl_encoder_is_frozen_during_generation_training(tmp_path):
    recipe = compose_recipe("default", [*TINY_OVERRIDES, "representation=ssl", "strategy.steps=4", f"run_root={tmp_path}"])
    model = build_model(recipe)
    model.set_stage(instantiate(recipe.strategy).stages[0])
    assert not any(p.requires_grad for p in model.representation.parameters())
    run = train(recipe)
    state = torch.load(run / "checkpoints" / "generation.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    # The encoder the run started from: the cached MAE of the same recipe and data.
    data = instantiate(recipe.data, _convert_="all")
    started = instantiate(recipe.representation, _convert_="all")
    started.prepare(data)
    encoder = {k.removeprefix("representation."): v for k, v in state.items() if k.startswith("representation.encoder.")}
    assert encoder and all(torch.equal(v, started.state_dict()[k]) for k, v in encoder.items())
    assert torch.equal(state["representation.feature_shift"], started.feature_shift)
    assert state["generator.final_layer.linear.weight"].abs().sum() > 0  # zero-initialised: the generator did train
