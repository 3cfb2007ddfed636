"""`data=webdataset`: samples from `.tar` shards (the WebDataset format BLIP3-o's data ships in).

A sample is the tar members sharing a key: an image (`jpg`, `jpeg`, `png` or `webp`) and a
caption (`txt`, or `json` holding `{"text": ...}` or `{"caption": ...}`). Training streams
the shards: each data-parallel rank takes every `world`-th shard of the epoch's shard order,
each loader worker every `workers`-th of those (webdataset's `split_by_worker`), and a
buffer shuffles samples across them, so every sample is read once per epoch by exactly one
(rank, worker). The val shards are read once into a list (map-style) for evaluation.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import random
from itertools import count, islice
from pathlib import Path
from typing import Annotated, Literal

import lightning as L
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from unizoo.config.recipe_types import AtLeast
from unizoo.data.image_files import DECODE_ERRORS, load_square
from unizoo.data.sampler import process_rank_and_count
from unizoo.data.skips import (
    EMPTY_FILE, INVALID_JSON, NO_CAPTION, NO_IMAGE_FIELD, UNDECODABLE, DataError, describe_skipped, merge_counts,
)
from unizoo.runtime.accelerator import loader_options, loader_workers
from unizoo.text import caption_words

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
UNREADABLE_SHARD = "unreadable_shard"  # a tar that cannot be opened or read to its end
REASONS = (INVALID_JSON, NO_CAPTION, NO_IMAGE_FIELD, EMPTY_FILE, UNDECODABLE, UNREADABLE_SHARD)
_ROWS = 65  # skip counters: row 0 for the main process, one per loader worker after it
LAYOUT = (
    "data=webdataset expects .tar shards whose samples hold an image (.jpg, .png or .webp) and a caption "
    '(.txt, or .json with {"text": ...}); `unizoo shards FOLDER OUT` writes them from an image folder'
)


def shard_paths(urls: str | list[str] | None, setting: str) -> list[str]:
    """The shards a brace pattern (`shards/train-{000000..000009}.tar`), a glob (`shards/train-*.tar`) or a list names.

    Globs because a brace pattern must be quoted twice on a command line (for the shell,
    then for Hydra's override grammar, which reads `{` as a dict): `'data.urls="..."'`.
    """
    if not urls:
        raise DataError(f"data=webdataset needs {setting}: a brace pattern, a glob or a list of .tar paths. {LAYOUT}.")
    if isinstance(urls, str) and any(c in urls for c in "*?["):
        paths = sorted(str(p) for p in Path(urls).expanduser().parent.glob(Path(urls).name))
        if not paths:
            raise DataError(f"{setting}={urls!r} matches no file. {LAYOUT}.")
    else:
        paths = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else [str(u) for u in urls]
    missing = [p for p in paths if not Path(p).expanduser().is_file()]
    if missing:
        raise DataError(f"{setting}: {len(missing)} of {len(paths)} shards do not exist, e.g. {missing[0]}. {LAYOUT}.")
    return [str(Path(p).expanduser()) for p in paths]


def caption_of(sample: dict) -> str | None | Exception:
    """The caption in a sample's `txt` or `json`; None if it has none; the error if its json is invalid."""
    if "txt" in sample:
        text = sample["txt"].decode("utf-8", errors="replace")
    elif "json" in sample:
        try:
            record = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return error
        text = (record.get("text") or record.get("caption")) if isinstance(record, dict) else None
        if not isinstance(text, str):
            return None
    else:
        return None
    text = " ".join(text.split())
    return text or None


class SkipCounts:
    """Reason -> count per process row, in shared memory, so loader workers' counts reach the main process."""

    def __init__(self) -> None:
        self.table = torch.zeros(_ROWS, len(REASONS), dtype=torch.int64).share_memory_()

    def add(self, reason: str) -> None:
        worker = get_worker_info()
        row = 0 if worker is None else 1 + worker.id % (_ROWS - 1)
        self.table[row, REASONS.index(reason)] += 1

    def totals(self) -> dict[str, int]:
        return {reason: int(n) for reason, n in zip(REASONS, self.table.sum(0).tolist()) if n}


def decode_sample(sample: dict, image_size: int, skips: SkipCounts | None) -> dict | None:
    """`{"image", "caption", "key"}` of a raw shard sample, or None (counted) if it is bad."""

    def skip(reason: str) -> None:
        if skips is not None:
            skips.add(reason)
        log.debug("skipped %s in %s: %s", sample.get("__key__"), sample.get("__url__"), reason)

    caption = caption_of(sample)
    if isinstance(caption, Exception):
        return skip(INVALID_JSON)
    if caption is None:
        return skip(NO_CAPTION)
    data = next((sample[key] for key in IMAGE_KEYS if key in sample), None)
    if data is None:
        return skip(NO_IMAGE_FIELD)
    if not data:
        return skip(EMPTY_FILE)
    try:
        image = load_square(bytes(data), image_size)
    except DECODE_ERRORS:
        return skip(UNDECODABLE)
    return {"image": image, "caption": caption, "key": sample["__key__"]}


class ShardStream(IterableDataset):
    """The samples of this rank's and this worker's shards, buffer-shuffled; epoch after epoch if `endless`.

    `rank` and `world` are taken when the loader is made, in the training process (where
    Lightning has set up the process group), not inside loader workers, which have none.
    Skips are counted in the first epoch only: each bad sample once, as in data=folder.
    """

    def __init__(self, shards: list[str], image_size: int, shuffle_buffer: int, seed: int, rank: int = 0, world: int = 1,
                 endless: bool = True, skips: SkipCounts | None = None) -> None:
        super().__init__()
        self.shards, self.image_size, self.shuffle_buffer, self.seed = shards, image_size, shuffle_buffer, seed
        self.rank, self.world, self.endless, self.skips = rank, world, endless, skips

    @property
    def shards_per_pass(self) -> int:
        """How many shards this process reads in a pass: every `world`-th of them from its `rank` on (`epoch`)."""
        return len(range(self.rank, len(self.shards), self.world))

    def _unreadable(self, error: Exception) -> bool:
        log.warning("data: skipped the rest of a shard: %s", error)
        if self.skips is not None:
            self.skips.add(UNREADABLE_SHARD)
        return True  # go on with the next shard

    def epoch(self, epoch: int):
        shards = list(self.shards)
        random.Random(f"{self.seed}:{epoch}").shuffle(shards)  # the same order on every rank
        worker = get_worker_info()
        stages = [
            wds.SimpleShardList(shards),
            lambda urls: islice(urls, self.rank, None, self.world),
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=self._unreadable),
        ]
        if self.shuffle_buffer > 1:
            stream_seed = f"{self.seed}:{epoch}:{self.rank}:{worker.id if worker else 0}"
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=stream_seed))
        skips = self.skips if epoch == 0 else None
        stages += [wds.map(lambda sample: decode_sample(sample, self.image_size, skips)), wds.select(lambda s: s is not None)]
        return wds.DataPipeline(*stages)

    def __iter__(self):
        for epoch in count() if self.endless else (0,):
            read = 0
            for read, sample in enumerate(self.epoch(epoch), start=1):
                yield sample
            if self.endless and not read:
                # An endless stream that reads nothing in a whole pass would pass after pass, never yielding and
                # never ending: the loader would wait on it without a word.
                worker = get_worker_info()
                raise DataError(
                    f"data.urls: {'loader worker ' + str(worker.id) + ' of ' if worker else ''}process {self.rank} of "
                    f"{self.world} read no sample in a whole pass over its shards (of {len(self.shards)}): every "
                    f"sample in them was skipped ({describe_skipped(self.skips.totals()) if self.skips else 'see the log'}), "
                    "or it was given none")


class SampleList(Dataset):
    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


class WebDataModule(L.LightningDataModule):
    """Streamed training shards and a val list; batches are `{"image": [B, 3, S, S], "caption": list[str], "key": list[str]}`."""

    has_exact_evaluator = False  # captions are free text: the shapes evaluator cannot read them

    def __init__(
        self,
        urls: str | list[str] | None = None,
        val_urls: str | list[str] | None = None,
        image_size: int = 32,
        batch_size: Annotated[int, AtLeast(1)] = 64,
        shuffle_buffer: int = 1000,
        vocabulary_size: int | None = 8192,
        seed: int = 0,
        num_workers: int | Literal["auto"] = "auto",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(frame=inspect.currentframe())  # see ShapesDataModule for why the frame
        self.shards = shard_paths(urls, "data.urls")
        self.val_shards = shard_paths(val_urls, "data.val_urls")
        self.image_size, self.batch_size, self.shuffle_buffer = image_size, batch_size, shuffle_buffer
        self.vocabulary_size, self.seed, self.num_workers = vocabulary_size, seed, num_workers
        self.skips = SkipCounts()
        self.val: SampleList | None = None
        self._val_skips = SkipCounts()

    def setup(self, stage: str | None = None) -> None:
        if self.val is not None:
            return
        stream = ShardStream(self.val_shards, self.image_size, shuffle_buffer=0, seed=self.seed, endless=False, skips=self._val_skips)
        self.val = SampleList(list(stream))
        if not self.val.items:
            raise DataError(f"data.val_urls: no readable sample in {len(self.val_shards)} shards "
                            f"(skipped {describe_skipped(self._val_skips.totals())}). {LAYOUT}.")
        log.info("data: %d train shards, %d val samples", len(self.shards), len(self.val))

    def dataset(self, split: str) -> Dataset:
        """The val split as a list; the train split is a stream (`train_dataloader`)."""
        self.setup()
        if split != "val":
            raise ValueError(f"data=webdataset streams its {split!r} split; only 'val' is a map-style data set")
        return self.val

    def train_stream(self) -> ShardStream:
        rank, world = process_rank_and_count()
        if world > len(self.shards):
            raise DataError(f"data.urls: {len(self.shards)} shards cannot be split over {world} processes without "
                            "duplicates; write more, smaller shards (unizoo shards --samples-per-shard)")
        return ShardStream(self.shards, self.image_size, self.shuffle_buffer, self.seed, rank, world, True, self.skips)

    def train_dataloader(self) -> DataLoader:
        stream = self.train_stream()
        # Each loader worker reads its own shards of this process's share: a worker without a shard would read
        # nothing, forever, and the loader, which takes the workers' batches in turn, would wait on it.
        share = stream.shards_per_pass
        asked = loader_workers(self.num_workers)
        if asked > share:
            log.info("data: %d loader workers, not %d (data.num_workers=%s): this process reads %d of the %d shards, "
                     "one worker a shard at least", share, asked, self.num_workers, share, len(self.shards))
        return DataLoader(stream, batch_size=self.batch_size, drop_last=True, **loader_options(min(asked, share)))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset("val"), batch_size=self.batch_size, shuffle=False)

    def prompts(self, split: str = "val", n: int = 64) -> list[str]:
        return [item["caption"] for item in self.dataset(split).items[:n]]

    def vocabulary(self) -> list[str]:
        """The words of every caption in the train and val shards (images are not decoded)."""
        samples = wds.DataPipeline(wds.SimpleShardList([*self.shards, *self.val_shards]), wds.tarfile_to_samples(handler=wds.warn_and_continue))
        captions = [c for sample in samples if isinstance(c := caption_of(sample), str)]
        return caption_words(captions, self.vocabulary_size)

    def skipped(self) -> dict[str, int]:
        """Reason -> samples skipped in the val shards and in the training stream's first epoch so far."""
        return merge_counts(self._val_skips.totals(), self.skips.totals())

    def content_signature(self) -> dict:
        """What identifies the shards' content for cache keys: their names and sizes."""
        listing = json.dumps([(p, Path(p).stat().st_size) for p in [*self.shards, *self.val_shards]])
        return {"shards": hashlib.sha256(listing.encode()).hexdigest()[:16]}
