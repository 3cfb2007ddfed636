"""`data=folder`: a user's images with captions, in the Hugging Face ImageFolder layout.

    DIR/metadata.jsonl    {"file_name": "cats/001.jpg", "text": "a cat on a sofa"}   one JSON object per line
    DIR/cats/001.jpg      images anywhere under DIR, any size and mode (RGB, L, RGBA, palette)

Bad samples are skipped and counted, never fatal (`unizoo.data.skips`): lines that are
not JSON or have no caption, files that are missing, empty or not images are dropped when
the listing is read; files whose header is fine but whose data is not (truncated) are
found when decoded. Only a folder with no `metadata.jsonl` or no readable image at all
is an error (`DataError`, exit 2 from the CLI).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import lightning as L
from torch.utils.data import DataLoader, Dataset

from unizoo.config.recipe_types import AtLeast
from unizoo.data.image_files import DECODE_ERRORS, header_problem, load_square
from unizoo.data.loaders import map_style_loader
from unizoo.data.skips import (
    INVALID_JSON, NO_CAPTION, NO_IMAGE_FIELD, UNDECODABLE, DataError, DecodeLedger, describe_skipped, merge_counts,
)
from unizoo.text import caption_words

log = logging.getLogger(__name__)

METADATA = "metadata.jsonl"
LAYOUT = (
    "data=folder expects the Hugging Face ImageFolder layout: images anywhere under the folder, and a "
    f"{METADATA} in it with one JSON object per line naming an image and its caption, e.g. "
    '{"file_name": "cats/001.jpg", "text": "a cat on a sofa"} (file_name relative to the folder)'
)
_EXAMPLES = 3  # bad lines quoted in the log, so the user can find the rest


@dataclass(frozen=True)
class Entry:
    """One listed sample: `key` is its file name relative to the folder (a stable id), `size` its bytes."""

    key: str
    path: Path
    caption: str
    size: int = 0


@dataclass
class Listing:
    entries: list[Entry]
    skipped: Counter
    examples: list[str]  # the first few skipped lines, "line 3: no_caption"


def metadata_file(folder: Path) -> Path:
    """`folder/metadata.jsonl`, or a `DataError` that names the folder and the layout."""
    if not folder.is_dir():
        raise DataError(f"data.path={str(folder)!r} is not a directory. {LAYOUT}.")
    path = folder / METADATA
    if not path.is_file():
        raise DataError(f"{folder} has no {METADATA}. {LAYOUT}.")
    return path


def read_listing(folder: Path, caption_key: str = "text", check_files: bool = True) -> Listing:
    """The samples `folder/metadata.jsonl` lists; with `check_files`, only those whose file looks like an image."""
    entries, skipped, examples = [], Counter(), []

    def skip(reason: str, line: int) -> None:
        skipped[reason] += 1
        if len(examples) < _EXAMPLES:
            examples.append(f"line {line}: {reason}")

    with metadata_file(folder).open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                skip(INVALID_JSON, number)
                continue
            name, caption = record.get("file_name"), record.get(caption_key)
            if not isinstance(name, str) or not name:
                skip(NO_IMAGE_FIELD, number)
                continue
            if not isinstance(caption, str) or not caption.strip():
                skip(NO_CAPTION, number)
                continue
            path = folder / name
            if check_files and (problem := header_problem(path)):
                skip(problem, number)
                continue
            entries.append(Entry(name, path, " ".join(caption.split()), path.stat().st_size if check_files else 0))
    return Listing(entries, skipped, examples)


def in_validation(key: str, fraction: float, seed: int) -> bool:
    """Whether `key` is in the val split: a hash of (seed, key), so the split never depends on file order."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


class FolderDataset(Dataset):
    """`{"image": [3, S, S] in [-1, 1], "caption": str, "key": str}` per entry.

    A file that fails to decode is recorded (`ledger`) and the next readable entry is served
    in its place, rather than the item being dropped in the collate: batches keep their
    size, so every data-parallel rank runs the same number of equally sized steps, and
    nothing downstream needs to handle short or empty batches. The stand-in appears twice
    in that epoch, rarely enough not to matter.
    """

    def __init__(self, entries: list[Entry], image_size: int) -> None:
        self.entries, self.image_size = entries, int(image_size)
        self.ledger = DecodeLedger(len(entries))

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self.entries)):
            i = (index + offset) % len(self.entries)
            if self.ledger.is_bad(i):
                continue
            entry = self.entries[i]
            try:
                image = load_square(entry.path, self.image_size)
            except DECODE_ERRORS as error:
                self.ledger.mark(i)
                log.debug("skipped %s: %s", entry.path, error)
                continue
            return {"image": image, "caption": entry.caption, "key": entry.key}
        raise DataError(f"none of the {len(self.entries)} images listed could be decoded. {LAYOUT}.")


class ImageFolderDataModule(L.LightningDataModule):
    """Train/val splits of an image folder; batches are `{"image": [B, 3, S, S], "caption": list[str], "key": list[str]}`."""

    has_exact_evaluator = False  # captions are free text: the shapes evaluator cannot read them

    def __init__(
        self,
        path: Annotated[str | None, "the image folder, holding metadata.jsonl"] = None,
        image_size: int = 32,
        batch_size: Annotated[int, AtLeast(1)] = 64,
        val_fraction: Annotated[float, "between 0 and 1"] = 0.1,
        val_path: str | None = None,
        caption_key: str = "text",
        vocabulary_size: int | None = 8192,
        seed: int = 0,
        num_workers: int | Literal["auto"] = "auto",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(frame=inspect.currentframe())  # see ShapesDataModule for why the frame
        if path is None:
            raise DataError(f"data=folder needs data.path=DIR, the folder of images. {LAYOUT}.")
        if not 0 <= val_fraction < 1 and val_path is None:
            raise DataError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        self.root = Path(path).expanduser()
        self.val_root = Path(val_path).expanduser() if val_path else None
        for folder in (self.root, self.val_root):
            if folder is not None:
                metadata_file(folder)  # a wrong path fails here, before any model is built
        self.image_size, self.batch_size, self.seed, self.num_workers = image_size, batch_size, seed, num_workers
        self.val_fraction, self.caption_key, self.vocabulary_size = val_fraction, caption_key, vocabulary_size
        self.datasets: dict[str, FolderDataset] = {}
        self._listing_skips: Counter = Counter()

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        listing = self._read(self.root)
        if self.val_root is not None:
            train, val_listing = listing.entries, self._read(self.val_root)
            val = val_listing.entries
            self._listing_skips = listing.skipped + val_listing.skipped
        else:
            val = [e for e in listing.entries if in_validation(e.key, self.val_fraction, self.seed)]
            train = [e for e in listing.entries if not in_validation(e.key, self.val_fraction, self.seed)]
            self._listing_skips = listing.skipped
        # The val split is decoded in full once, here: its first images and captions are the
        # evaluation's references (FID, prompts), which must pair up exactly, so no stand-ins there.
        # It is the small split; the train split is decoded as it is read (FolderDataset).
        readable = [e for e in val if self._decodes(e)]
        self._listing_skips[UNDECODABLE] += len(val) - len(readable)
        val = readable
        if not train or not val:
            where = "data.val_path" if self.val_root is not None and not val else "data.path"
            raise DataError(
                f"{where}: the {'val' if not val else 'train'} split has no readable image "
                f"({len(train)} train, {len(val)} val of {len(listing.entries)} readable in {self.root}); "
                "give more images, or set data.val_fraction / data.val_path. " + LAYOUT + "."
            )
        if len(train) < self.batch_size:
            raise DataError(f"{self.root}: the train split has {len(train)} readable images, fewer than data.batch_size={self.batch_size}")
        self.datasets = {"train": FolderDataset(train, self.image_size), "val": FolderDataset(val, self.image_size)}
        log.info("data: %s: %d train and %d val images", self.root, len(train), len(val))

    def _decodes(self, entry: Entry) -> bool:
        try:
            load_square(entry.path, self.image_size)
        except DECODE_ERRORS as error:
            log.warning("data: skipped %s (val split): %s", entry.path, error)
            return False
        return True

    def _read(self, folder: Path) -> Listing:
        listing = read_listing(folder, self.caption_key)
        if not listing.entries:
            raise DataError(
                f"{folder} has no readable image: {METADATA} lists none that opens "
                f"(skipped {describe_skipped(dict(listing.skipped))}). {LAYOUT}."
            )
        if listing.skipped:
            log.warning("data: %s: skipped %s while listing (%s)", folder / METADATA, describe_skipped(dict(listing.skipped)),
                        "; ".join(listing.examples))
        return listing

    def dataset(self, split: str) -> FolderDataset:
        self.setup()
        if split not in self.datasets:
            raise ValueError(f"unknown split {split!r}; data=folder has 'train' and 'val'")
        return self.datasets[split]

    def train_dataloader(self) -> DataLoader:
        return map_style_loader(self.dataset("train"), self.batch_size, self.seed, True, self.num_workers, self.trainer)

    def val_dataloader(self) -> DataLoader:
        return map_style_loader(self.dataset("val"), self.batch_size, self.seed, False, self.num_workers)

    def prompts(self, split: str = "val", n: int = 64) -> list[str]:
        """The first `n` captions of `split`: fixed prompts for sample grids and evaluation."""
        return [entry.caption for entry in self.dataset(split).entries[:n]]

    def vocabulary(self) -> list[str]:
        """The words of every caption listed (val too: evaluation prompts come from there), most frequent first kept."""
        captions = [e.caption for folder in (self.root, self.val_root) if folder for e in read_listing(folder, self.caption_key, False).entries]
        return caption_words(captions, self.vocabulary_size)

    def skipped(self) -> dict[str, int]:
        """Reason -> samples skipped: at listing, and found undecodable so far (each sample once)."""
        decoded = sum(dataset.ledger.count() for dataset in self.datasets.values())
        return merge_counts(self._listing_skips, {UNDECODABLE: decoded})

    def content_signature(self) -> dict:
        """What identifies this data's content for cache keys: the listings' bytes and the images' sizes."""
        self.setup()
        signature = {}
        for folder in (self.root, self.val_root):
            if folder is not None:
                signature[str(folder)] = hashlib.sha256((folder / METADATA).read_bytes()).hexdigest()[:16]
        entries = [e for d in self.datasets.values() for e in d.entries]
        signature["images"], signature["bytes"] = len(entries), sum(e.size for e in entries)
        return signature
