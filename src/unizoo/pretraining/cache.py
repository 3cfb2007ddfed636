"""A content-addressed cache for models unizoo trains for itself (tiny VAE, tiny CLIP).

The key is a hash of everything that decides the result (architecture, training
settings, data recipe), so a changed recipe trains afresh and an unchanged one
reuses the weights. Entries are written to a temporary directory and renamed into
place, so a crash never leaves a half-written entry that later runs would trust.
Processes that need the same missing entry at once (a study's variants side by side,
`unizoo study --parallel`) build it once: the first holds a lock file while it builds,
the others wait for it and load its result. Lock files live apart, under
`<cache>/.locks/<kind>/`, so a kind's folder lists its entries and nothing else.
"""

from __future__ import annotations

import hashlib
import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

try:  # POSIX; elsewhere concurrent builders each build, and the first rename wins
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """`$UNIZOO_CACHE`, else `~/.cache/unizoo`."""
    return Path(os.environ.get("UNIZOO_CACHE", Path.home() / ".cache" / "unizoo")).expanduser()


def content_hash(signature: Any) -> str:
    """A short, stable hash of a JSON-serialisable signature."""
    blob = json.dumps(signature, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cached_directory(kind: str, signature: Any, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """The cache entry for `signature`, calling `build(tmp_dir)` to fill it when missing.

    `build` runs under a fixed seed in a forked RNG: the key stands for the weights, so
    what the caller drew before (other models built first in a recipe) must not change
    them, and the caller's random stream continues as if `build` had not run.
    Returns the entry's path and whether it was already there.
    """
    entry = cache_root() / kind / content_hash(signature)
    if (entry / "signature.json").is_file():
        return entry, True
    entry.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(entry, kind):
        if (entry / "signature.json").is_file():  # another process built it while this one waited
            return entry, True
        _build_entry(entry, signature, build)
    return entry, False


@contextlib.contextmanager
def _build_lock(entry: Path, kind: str):
    """Hold `<cache>/.locks/<kind>/<hash>.lock` while building the entry; wait, with a log line, where another process holds it.

    The lock file is left in place: deleting it after unlocking would let a waiter lock
    an unlinked file while a newcomer locks a fresh one, and both build.
    """
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    lock_path = cache_root() / ".locks" / kind / f"{entry.name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s %s: another process is building it; waiting for it (lock %s)", kind, entry.name, handle.name)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_entry(entry: Path, signature: Any, build: Callable[[Path], None]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            build(tmp)
        (tmp / "signature.json").write_text(json.dumps(signature, sort_keys=True, indent=2, default=str))
        if entry.exists():  # another process finished first: keep theirs
            shutil.rmtree(tmp)
        else:
            tmp.rename(entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
