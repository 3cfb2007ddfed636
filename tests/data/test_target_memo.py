"""The target memo: a frozen representation's tokens of each training item, encoded once and read after.

The acceptance check: training with the memo logs exactly the losses of training without
it, over several epochs, while the later epochs encode nothing. Other tests show what the
memo reads and encodes batch by batch, that it stays off where the representation trains,
and that batches carry their items' indices on the host.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from conftest import TINY_OVERRIDES
from unizoo.config.composition import compose_recipe
from unizoo.data.datamodule import ShapesDataModule
from unizoo.data.target_memo import INDEX, IndexedDataset, TargetMemo, index_training_items
from unizoo.eval.shapes_classifier import has_scene_labels
from unizoo.training.build import build_model
from unizoo.training.train import train


class _CountingEncoder:
    """An encoder whose tokens are a function of each image alone, counting the images it is given."""

    def __init__(self) -> None:
        self.images = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.images += len(images)
        return images.flatten(1)[:, :6].reshape(len(images), 3, 2) * 2.0


def _batch(indices: list[int]) -> dict:
    # Item i's image is the constant i: the tokens say which item they came from.
    images = torch.stack([torch.full((3, 4, 4), float(i)) for i in indices])
    return {"image": images, "caption": [f"item {i}" for i in indices], INDEX: list(indices)}


def test_items_are_encoded_once_then_read_and_a_mixed_batch_encodes_only_its_new_items():
    memo, encode = TargetMemo(), _CountingEncoder()
    memo.reset(enabled=True)
    first = memo.tokens(_batch([0, 1, 2, 3]), encode)
    assert encode.images == 4
    again = memo.tokens(_batch([3, 1, 0, 2]), encode)  # the next epoch, reshuffled
    assert encode.images == 4  # nothing encoded again
    torch.testing.assert_close(again, first[[3, 1, 0, 2]], rtol=0, atol=0)
    mixed = memo.tokens(_batch([2, 7, 0, 9]), encode)
    assert encode.images == 6  # items 7 and 9 only
    torch.testing.assert_close(mixed, _CountingEncoder()(_batch([2, 7, 0, 9])["image"]), rtol=0, atol=0)
    assert (memo.read, memo.encoded) == (6, 6)
    assert memo.summary() == ("target memo: 6 of 12 training items (50%) read the frozen representation's tokens from "
                              "memory instead of encoding them (6 items kept, 0.0 MB)")


def test_off_it_encodes_every_batch_and_a_reset_empties_it():
    memo, encode = TargetMemo(), _CountingEncoder()
    memo.reset(enabled=False)  # a stage that trains the representation: its tokens change every step
    for _ in range(2):
        memo.tokens(_batch([0, 1]), encode)
    assert encode.images == 4 and not memo.rows and memo.summary() is None
    memo.reset(enabled=True)
    memo.tokens(_batch([0, 1]), encode)
    memo.reset(enabled=True)  # the next stage starts empty
    memo.tokens(_batch([0, 1]), encode)
    assert encode.images == 8
    batch = _batch([0, 1])
    del batch[INDEX]  # a streamed data set's batch (webdataset): no indices, encoded as it comes
    memo.tokens(batch, encode)
    assert encode.images == 10


def test_past_its_budget_new_items_are_encoded_each_time():
    row_bytes = 3 * 2 * 4  # one item's tokens: 3 x 2 float32
    memo, encode = TargetMemo(max_bytes=3 * row_bytes), _CountingEncoder()
    memo.reset(enabled=True)
    memo.tokens(_batch([0, 1, 2, 3, 4]), encode)
    assert sorted(memo.rows) == [0, 1, 2] and memo.bytes == 3 * row_bytes
    tokens = memo.tokens(_batch([4, 0, 3]), encode)
    assert encode.images == 5 + 2  # 4 and 3 again
    torch.testing.assert_close(tokens, _CountingEncoder()(_batch([4, 0, 3])["image"]), rtol=0, atol=0)


def test_training_batches_carry_their_items_indices_on_the_host_and_validation_batches_none():
    datamodule = ShapesDataModule(train_size=64, val_size=16, test_size=16, batch_size=8)
    datamodule.setup("fit")
    base = datamodule.dataset("train")
    assert index_training_items(datamodule)
    train_set = datamodule.dataset("train")
    assert isinstance(train_set, IndexedDataset)
    # Its batched draw is the base's, with the index added.
    for item, expected, index in zip(train_set.__getitems__([5, 2]), base.__getitems__([5, 2]), [5, 2], strict=True):
        assert item[INDEX] == index and item["caption"] == expected["caption"]
        torch.testing.assert_close(item["image"], expected["image"], rtol=0, atol=0)
    batch = datamodule.on_before_batch_transfer(next(iter(datamodule.train_dataloader())), 0)  # as Lightning calls it
    assert isinstance(batch[INDEX], list) and len(batch[INDEX]) == 8 and all(isinstance(i, int) for i in batch[INDEX])
    for image, index in zip(batch["image"], batch[INDEX], strict=True):  # each image is its index's item
        torch.testing.assert_close(image, base[index]["image"], rtol=0, atol=0)
    assert INDEX not in next(iter(datamodule.val_dataloader()))
    # What the split holds besides its items is still there: the scene labels behind each image, from which the
    # shapes classifier learns and by which `evaluation.features: auto` picks it.
    assert train_set.scene(5) == base.scene(5) and has_scene_labels(datamodule)


class _StreamedData(L.LightningDataModule):
    def dataset(self, split: str):
        raise NotImplementedError("a streamed data set has no indexable split")


def test_a_streamed_training_set_is_left_as_it_is():
    assert not index_training_items(_StreamedData())


def _stage(recipe):
    return instantiate(recipe.strategy, _convert_="all").stages[0]


def test_the_memo_is_on_where_the_stage_keeps_the_representation_frozen_and_off_where_it_trains_it():
    recipe = compose_recipe("default", TINY_OVERRIDES)
    model = build_model(recipe)
    model.set_stage(_stage(recipe))
    assert model.target_memo.enabled  # generation: the VAE is frozen
    repa_e = compose_recipe("default", [*TINY_OVERRIDES, "strategy=repa_e", "alignment.block=1"])
    model = build_model(repa_e)
    model.set_stage(_stage(repa_e))
    assert not model.target_memo.enabled  # REPA-E trains the VAE: its tokens move every step


def _losses(run_dir: Path) -> list[float]:
    with (run_dir / "logs" / "generation" / "metrics.csv").open() as file:
        return [float(row["train/loss"]) for row in csv.DictReader(file) if row.get("train/loss")]


def test_training_with_the_memo_logs_exactly_the_losses_of_training_without_it(tmp_path, monkeypatch, caplog):
    # 256 items in batches of 8: 32 steps an epoch, so 80 steps are 2.5 epochs.
    overrides = [*TINY_OVERRIDES, "strategy.steps=80", f"run_root={tmp_path / 'memo'}"]
    with caplog.at_level(logging.INFO, logger="unizoo"):
        with_memo = _losses(train(compose_recipe("default", overrides)))
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("target memo:")]
    assert len(said) == 1 and said[0].startswith("target memo: 384 of 640 training items (60%) read the frozen "
                                                 "representation's tokens from memory instead of encoding them (256 items kept, ")
    reset = TargetMemo.reset
    monkeypatch.setattr(TargetMemo, "reset", lambda memo, enabled: reset(memo, False))
    overrides[-1] = f"run_root={tmp_path / 'plain'}"
    without = _losses(train(compose_recipe("default", overrides)))
    assert len(with_memo) == 80
    assert with_memo == without  # to the bit: the same tokens, whichever batch mates they were encoded with
