"""`unizoo shards FOLDER OUT`: an image folder (data=folder's layout) written as WebDataset tar shards.

Images are stored as their original bytes (no re-encoding, so nothing is lost and it is
fast); a file whose header shows it is no image is left out and counted, like data=folder
does. The split follows data=folder's (a hash of each file name), so training on the
shards holds out the same images: OUT/train-NNNNNN.tar and OUT/val-NNNNNN.tar.
"""

from __future__ import annotations

import logging
from pathlib import Path

import webdataset as wds

from unizoo.data.folder import Entry, in_validation, read_listing
from unizoo.data.skips import DataError, describe_skipped

log = logging.getLogger(__name__)

# Image formats a shard sample may hold as they are; any other (bmp, gif, tiff) is stored as PNG.
_STORED = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


def sample_key(file_name: str) -> str:
    """A shard key for a file name: the path without its suffix, dots made underscores (WebDataset
    splits a member name into key and extension at the first dot of its base name)."""
    path = Path(file_name)
    return (path.parent / path.stem.replace(".", "_")).as_posix()


def _sample(entry: Entry) -> dict:
    extension = _STORED.get(entry.path.suffix.lower())
    if extension is None:
        from io import BytesIO

        from PIL import Image

        buffer = BytesIO()
        with Image.open(entry.path) as image:
            image.save(buffer, "PNG")
        data, extension = buffer.getvalue(), "png"
    else:
        data = entry.path.read_bytes()
    return {"__key__": sample_key(entry.key), extension: data, "txt": entry.caption}


def write_shards(folder: Path, out: Path, samples_per_shard: int = 1000, val_fraction: float = 0.1, seed: int = 0) -> dict[str, str]:
    """Write the folder's train and val samples as shards under `out`; returns each split's glob pattern."""
    listing = read_listing(folder)
    if not listing.entries:
        raise DataError(f"{folder} has no readable image (skipped {describe_skipped(dict(listing.skipped))})")
    if listing.skipped:
        log.warning("shards: skipped %s of %s (%s)", describe_skipped(dict(listing.skipped)), folder, "; ".join(listing.examples))
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(out.glob("train-*.tar")) + sorted(out.glob("val-*.tar"))
    if stale:  # a glob over OUT would mix them with the new ones
        raise DataError(f"{out} already holds shards ({stale[0].name}, ...): write to an empty folder")
    patterns = {}
    for split in ("train", "val"):
        entries = [e for e in listing.entries if in_validation(e.key, val_fraction, seed) == (split == "val")]
        if not entries:
            continue
        with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=samples_per_shard, verbose=0) as sink:
            for entry in entries:
                sink.write(_sample(entry))
            shards = sink.shard
        patterns[split] = str(out / f"{split}-*.tar")
        log.info("shards: %d %s samples in %d shards: %s", len(entries), split, shards, patterns[split])
    return patterns
