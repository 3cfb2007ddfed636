"""Bad samples are skipped and counted, never fatal: the reasons, and a ledger that survives loader workers.

A sample can be found bad in two places: when a data module reads its listing (a
`metadata.jsonl` line without a caption, a file that is missing, empty or not an image),
and when an image is decoded (a truncated or corrupt file whose header looked fine).
The second happens inside DataLoader worker processes, whose Python objects the main
process never sees, so decode failures are recorded in shared memory.
"""

from __future__ import annotations

from collections import Counter

import torch

from unizoo.data.errors import DataError  # noqa: F401  (re-exported: the data modules raise it)

# Every reason a sample is skipped for, as written to metrics.json `data.skipped`.
INVALID_JSON = "invalid_json"  # a metadata.jsonl line that is not a JSON object
NO_CAPTION = "no_caption"  # a metadata line or shard sample without a non-empty caption
NO_IMAGE_FIELD = "no_file_name"  # a metadata line without `file_name` / a shard sample without an image
MISSING_FILE = "missing_file"  # `file_name` names no file
EMPTY_FILE = "empty_file"  # a zero-byte file
NOT_AN_IMAGE = "not_an_image"  # PIL cannot identify the file's format
UNDECODABLE = "undecodable_image"  # the header is fine but decoding fails (truncated, corrupt)
DECODE_REASONS = (UNDECODABLE,)


class DecodeLedger:
    """Which items of a map-style data set failed to decode, in shared memory (one byte per item).

    Marking is idempotent (an item is bad once, however many epochs or workers meet it), so
    the counts are of distinct samples and no lock is needed. The tensor is shared with
    worker processes both when they fork and when they are spawned (torch pickles shared
    storage by handle).
    """

    def __init__(self, size: int) -> None:
        self._bad = torch.zeros(size, dtype=torch.uint8).share_memory_()

    def mark(self, index: int) -> None:
        self._bad[index] = 1

    def is_bad(self, index: int) -> bool:
        return bool(self._bad[index])

    def count(self) -> int:
        return int(self._bad.sum())


def merge_counts(*counts: dict[str, int]) -> dict[str, int]:
    """Reason -> count summed over several sources, without zero entries, sorted by reason."""
    total: Counter = Counter()
    for c in counts:
        total.update(c)
    return {reason: n for reason, n in sorted(total.items()) if n}


def describe_skipped(skipped: dict[str, int]) -> str:
    """`3 samples (missing_file 1, undecodable_image 2)`, for the log."""
    total = sum(skipped.values())
    if not total:
        return "no samples"
    return f"{total} sample{'s' if total != 1 else ''} ({', '.join(f'{reason} {n}' for reason, n in skipped.items())})"
