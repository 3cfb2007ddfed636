"""data=webdataset: tar shards written by `unizoo shards`, split over ranks and workers without duplicates."""

from __future__ import annotations

import io
import json
from collections import Counter

import pytest
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from image_folder import write_image_folder
from unizoo.cli import main
from unizoo.data.shard_writer import sample_key
from unizoo.data.shards import ShardStream, WebDataModule
from unizoo.data.skips import DataError

GOOD = 40


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A folder with bad files, written as shards of 4 samples by the CLI."""
    root = tmp_path_factory.mktemp("data")
    lines = write_image_folder(root / "folder", GOOD)
    assert main(["shards", str(root / "folder"), str(root / "shards"), "--samples-per-shard", "4"]) == 0
    return root / "shards", lines


def _keys(stream, workers: int) -> list[str]:
    return [item["key"] for item in DataLoader(stream, batch_size=None, num_workers=workers)]


def test_folder_to_shards_round_trip_keeps_every_key_and_caption(shards):
    out, lines = shards
    data = WebDataModule(urls=str(out / "train-*.tar"), val_urls=str(out / "val-*.tar"), batch_size=4, shuffle_buffer=8)
    data.setup()
    train = list(ShardStream(data.shards, 32, 8, seed=0, endless=False, skips=data.skips))
    seen = {(item["key"], item["caption"]) for item in [*train, *data.dataset("val").items]}
    assert seen == {(sample_key(line["file_name"]), line["text"]) for line in lines}
    assert all(item["image"].shape == (3, 32, 32) for item in train)
    # The writer left out what data=folder skips when listing; the truncated JPEG went in as bytes and is skipped when decoded.
    assert data.skipped() == {"undecodable_image": 1}
    assert set(data.vocabulary()) == {word for line in lines for word in line["text"].split()}
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and len(batch["caption"]) == 4


def test_two_ranks_times_two_workers_see_every_sample_exactly_once_per_epoch(shards):
    out, _ = shards
    paths = sorted(str(p) for p in out.glob("train-*.tar"))
    assert len(paths) >= 4
    every = Counter(_keys(ShardStream(paths, 32, 0, seed=0, endless=False), 0))
    per_rank = [_keys(ShardStream(paths, 32, 16, seed=0, rank=rank, world=2, endless=False), 2) for rank in (0, 1)]
    assert all(per_rank) and Counter(per_rank[0] + per_rank[1]) == every and max(every.values()) == 1
    # The next epoch (shards reshuffled before they are dealt to ranks): the same samples once each, in another order.
    streams = [ShardStream(paths, 32, 16, seed=0, rank=rank, world=2) for rank in (0, 1)]
    first, second = ([s["key"] for stream in streams for s in stream.epoch(epoch)] for epoch in (0, 1))
    assert Counter(second) == every and first != second


def _png(size=(10, 12), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 128).save(buffer, "PNG")
    return buffer.getvalue()


def test_json_captions_webp_and_bad_samples(tmp_path):
    webp = io.BytesIO()
    Image.new("RGB", (20, 10), (0, 255, 0)).save(webp, "WEBP")
    with wds.TarWriter(str(tmp_path / "s-0.tar")) as sink:
        sink.write({"__key__": "a", "png": _png(mode="L"), "json": json.dumps({"text": "grey  box"}).encode()})
        sink.write({"__key__": "b", "webp": webp.getvalue(), "json": json.dumps({"caption": "green box"}).encode()})
        sink.write({"__key__": "c", "png": _png()})
        sink.write({"__key__": "d", "txt": "no image"})
        sink.write({"__key__": "e", "png": _png(), "json": b"{not json"})
        sink.write({"__key__": "f", "png": b"", "txt": "empty"})
        sink.write({"__key__": "g", "jpg": b"\xff\xd8\xff garbage", "txt": "broken"})
    stream = ShardStream([str(tmp_path / "s-0.tar")], 16, 0, seed=0, endless=False, skips=None)
    data = WebDataModule(urls=str(tmp_path / "s-0.tar"), val_urls=str(tmp_path / "s-0.tar"))
    data.setup()
    assert [(item["key"], item["caption"]) for item in data.dataset("val").items] == [("a", "grey box"), ("b", "green box")]
    assert data.dataset("val")[1]["image"][1].min() > 0.95  # green, resized from 20 x 10 and centre-cropped
    assert data.skipped() == {"no_caption": 1, "no_file_name": 1, "invalid_json": 1, "empty_file": 1, "undecodable_image": 1}
    assert len(list(stream)) == 2


def test_missing_shards_and_too_few_shards_are_clear_errors(shards, tmp_path, monkeypatch):
    out, _ = shards
    with pytest.raises(DataError, match="data.urls"):
        WebDataModule(urls=None, val_urls=str(out / "val-*.tar"))
    with pytest.raises(DataError, match="matches no file"):
        WebDataModule(urls=str(tmp_path / "train-*.tar"), val_urls=str(out / "val-*.tar"))
    data = WebDataModule(urls=sorted(str(p) for p in out.glob("train-*.tar"))[:1], val_urls=str(out / "val-*.tar"))
    monkeypatch.setattr("unizoo.data.shards.process_rank_and_count", lambda: (0, 2))
    with pytest.raises(DataError, match="1 shards cannot be split over 2 processes"):
        data.train_dataloader()
    assert main(["shards", str(tmp_path), str(tmp_path / "out")]) == 2  # no metadata.jsonl


def test_no_loader_worker_is_left_without_a_shard(shards, caplog):
    # A worker whose share of shards is empty read nothing, pass after pass, and the loader, which takes the
    # workers' batches in turn, waited on it forever: on a GPU `num_workers: auto` asks for up to 8.
    out, _ = shards
    two = sorted(str(p) for p in out.glob("train-*.tar"))[:2]
    data = WebDataModule(urls=two, val_urls=str(out / "val-*.tar"), batch_size=2, shuffle_buffer=0, num_workers=3)
    with caplog.at_level("INFO", logger="unizoo.data.shards"):
        loader = data.train_dataloader()
    assert loader.num_workers == 2
    assert "data: 2 loader workers, not 3 (data.num_workers=3): this process reads 2 of the 2 shards" in caplog.text
    batches = iter(loader)
    keys = [key for _ in range(5) for key in next(batches)["key"]]  # 10 samples: past the first pass (8 or fewer)
    assert len(keys) == 10


def test_an_endless_stream_that_reads_nothing_in_a_pass_says_so_instead_of_waiting(tmp_path):
    with wds.TarWriter(str(tmp_path / "bad-0.tar")) as sink:
        sink.write({"__key__": "a", "txt": "no image"})
        sink.write({"__key__": "b", "png": b"", "txt": "empty"})
    stream = ShardStream([str(tmp_path / "bad-0.tar")], 16, 0, seed=0)
    with pytest.raises(DataError, match=r"data.urls: process 0 of 1 read no sample in a whole pass over its shards \(of 1\)"):
        next(iter(stream))
