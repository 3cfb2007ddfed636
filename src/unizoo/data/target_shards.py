"""Pre-extracted generation targets on disk: safetensors shards plus a manifest saying what made them.

A folder written by `unizoo cache-targets targets=DIR`:

    DIR/manifest.json              what the targets are: the recipe's representation and data blocks
                                   (`signature`) and their hash, item count, token shape, dtype, shards
    DIR/targets-00000.safetensors  `targets` (n, N, C): the representation's tokens of n training items,
                                   `indices` (n,): which items (positions in the data module's train split)

A target is exactly what `representation.encode(image)` returns during training (normalised
latents or features), so training can read it instead of running the frozen encoder. The
manifest's hash covers every recipe value the targets depend on, and a run whose recipe
differs is refused (`TargetsMismatch`) instead of training on another model's targets.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from unizoo.data.signature import _SERVING_ONLY
from unizoo.errors import RecipeError
from unizoo.pretraining.cache import content_hash

MANIFEST = "manifest.json"
FORMAT = 1
SHARD_NAME = "targets-{:05d}.safetensors"


class TargetsMismatch(RecipeError):
    """A target cache made for another representation or data recipe than the run's."""


def targets_signature(recipe: DictConfig) -> dict[str, Any]:
    """The recipe values the targets depend on: the whole representation block and the data's content.

    The whole representation block, not a hand-picked subset: a value that turns out not to change
    the targets (the CLIP decoder's settings) costs a re-extraction, a missed one would train on
    wrong targets without a word. The data's serving settings (workers) never change an item.
    """
    data = OmegaConf.to_container(recipe.data, resolve=True)
    return {
        "representation": OmegaConf.to_container(recipe.representation, resolve=True),
        "data": {key: value for key, value in data.items() if key not in _SERVING_ONLY},
    }


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): tree}


def describe_difference(cached: dict[str, Any], wanted: dict[str, Any], limit: int = 6) -> str:
    """`key (cache X, this run Y), ...` for the recipe values that differ."""
    a, b = _flatten(cached), _flatten(wanted)
    keys = sorted(key for key in a.keys() | b.keys() if a.get(key, "<unset>") != b.get(key, "<unset>"))
    parts = [f"{key} (cache {a.get(key, '<unset>')!r}, this run {b.get(key, '<unset>')!r})" for key in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return ", ".join(parts)


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The folder's manifest, or None where there is none (nothing cached there, or an interrupted write)."""
    path = Path(directory) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def check_signature(directory: Path, manifest: dict[str, Any], signature: dict[str, Any]) -> None:
    """Raise `TargetsMismatch` naming both hashes and the values that differ, unless `signature` made the cache."""
    wanted = content_hash(signature)
    if manifest["hash"] == wanted:
        return
    raise TargetsMismatch(
        f"the target cache {directory} was made for another recipe (representation + data hash "
        f"{manifest['hash']}, {manifest['signature']['representation'].get('_target_', '?')}) than this run's "
        f"(hash {wanted}, {signature['representation'].get('_target_', '?')}); they differ in "
        f"{describe_difference(manifest['signature'], signature)}. Its targets would not be what this run's "
        f"representation computes. Write a cache for this recipe (unizoo cache-targets targets=NEW_DIR with this "
        f"run's overrides) or leave out targets= to encode images on the fly."
    )


def _default_permissions(folder: Path) -> None:
    """What the umask gives new files: mkdtemp's folder is private (0700), and a cache may be shared."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def write_shards(
    directory: Path,
    signature: dict[str, Any],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    items: int,
    items_per_shard: int = 4096,
) -> dict[str, Any]:
    """Write `(indices, targets)` batches as shards of `items_per_shard` and the manifest; returns the manifest.

    Written into a temporary sibling folder and renamed into place at the end, so an interrupted
    run leaves no folder that looks complete.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        shards, pending, seen, shape, dtype = [], [], 0, None, None  # pending: (indices, targets) of the next shard

        def flush() -> None:
            name = SHARD_NAME.format(len(shards))
            indices = torch.cat([i for i, _ in pending]).to(torch.int64)
            save_file({"targets": torch.cat([t for _, t in pending]).contiguous(), "indices": indices}, str(tmp / name))
            shards.append({"file": name, "items": len(indices)})
            pending.clear()

        for indices, targets in batches:
            shape, dtype = list(targets.shape[1:]), str(targets.dtype).removeprefix("torch.")
            while len(indices):
                take = items_per_shard - sum(len(i) for i, _ in pending)
                pending.append((indices[:take], targets[:take]))
                seen += len(pending[-1][0])
                indices, targets = indices[take:], targets[take:]
                if sum(len(i) for i, _ in pending) == items_per_shard:
                    flush()
        if pending:
            flush()
        if seen > items:
            raise RuntimeError(f"encoded {seen} items, the training split has {items}")
        manifest = {
            "format": FORMAT,
            "hash": content_hash(signature),
            "items": items,  # the training split's size; `targets` fewer where the data set skipped unreadable items
            "targets": seen,
            "shape": shape,
            "dtype": dtype,
            "shards": shards,
            "bytes": sum((tmp / s["file"]).stat().st_size for s in shards),
            "signature": signature,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        _default_permissions(tmp)
        if directory.exists():  # an empty folder the user made (the caller refuses anything else)
            directory.rmdir()
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


class TargetShards:
    """Random access to a cache's targets by item index: `shards[i]` is item i's `(N, C)` target.

    Shards are memory-mapped (safetensors `safe_open`), not loaded: a CLIP cache of a large
    training set need not fit in memory, and a row costs about 10 microseconds. Picklable
    (dataloader workers, spawned DDP processes): each process opens the files itself.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()
        manifest = read_manifest(self.directory)
        if manifest is None:
            raise FileNotFoundError(
                f"targets={directory}: no target cache there ({self.directory / MANIFEST} is missing). Write one with "
                f"`unizoo cache-targets targets={directory}` and the same recipe overrides as the run, or leave out targets="
            )
        if manifest.get("format") != FORMAT:
            raise RecipeError(f"targets={directory}: cache format {manifest.get('format')!r}, this unizoo reads {FORMAT}; write it again")
        self.manifest, self.items = manifest, int(manifest["items"])
        # Where every item lives: (shard, row). Read from the shards' own `indices`, so nothing
        # assumes the order they were written in; each item at most once, and all but those
        # the data set skipped as unreadable when the cache was written (manifest "targets" < "items").
        self.shard_of = torch.full((self.items,), -1, dtype=torch.int64)
        self.row_of = torch.full((self.items,), -1, dtype=torch.int64)
        for number, shard in enumerate(manifest["shards"]):
            path = self.directory / shard["file"]
            if not path.is_file():
                raise FileNotFoundError(f"targets={directory}: shard {path} named in the manifest is missing; write the cache again")
            with safe_open(str(path), framework="pt") as handle:
                indices = handle.get_tensor("indices")
            if (indices < 0).any() or (indices >= self.items).any() or (self.shard_of[indices] >= 0).any():
                raise RecipeError(f"targets={directory}: shard {path} holds item indices outside 0..{self.items - 1} or twice")
            self.shard_of[indices] = number
            self.row_of[indices] = torch.arange(len(indices))
        missing = int((self.shard_of < 0).sum())
        if missing != self.items - manifest.get("targets", self.items):
            raise RecipeError(f"targets={directory}: {missing} of {self.items} items have no target; write the cache again")
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.items

    def __getitem__(self, index: int) -> torch.Tensor:
        shard = int(self.shard_of[index])
        if shard < 0:
            raise KeyError(f"item {index} has no target in {self.directory}: the data set skipped it (unreadable) when "
                           "the cache was written, and gives it now; write the cache again")
        if shard not in self._handles:
            path = self.directory / self.manifest["shards"][shard]["file"]
            self._handles[shard] = safe_open(str(path), framework="pt").get_slice("targets")
        return self._handles[shard][int(self.row_of[index])]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}  # open files do not travel; each process opens its own
