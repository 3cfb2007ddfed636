"""`unizoo cache-targets targets=DIR [overrides]`: encode the training set once through the frozen representation.

The recipe is composed and checked as `unizoo train` does, the data module and the
representation are built and prepared as training prepares them (the tiny VAE or CLIP
loaded from unizoo's cache or pretrained, CLIP's normalisation fitted), and every
training item's target tokens are written as safetensors shards (unizoo.data.target_shards).
`unizoo train targets=DIR` with the same overrides then reads them instead of running
the encoder (fast-DiT's extract_features.py does this for DiT).

Only a fixed training set makes sense to cache: the shapes data draws its items on the
fly and the command caches `data.train_size` of them; random augmentation would make a
cached target stale (no shipped data module augments).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from unizoo.config.recipe_types import check_recipe_types
from unizoo.data.target_shards import TargetShards, check_signature, read_manifest, targets_signature, write_shards
from unizoo.data.with_targets import indexable_train_set
from unizoo.errors import RecipeError
from unizoo.runtime.accelerator import loader_workers
from unizoo.runtime.fabric import loops_on, named_device

log = logging.getLogger(__name__)


def _device(name: str) -> torch.device:
    """`--device`: auto (cuda if available), or a device this machine has; another is a `RecipeError` naming it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = named_device(name)
    except RuntimeError as error:
        raise RecipeError(f"--device {error}") from None
    if device.type not in ("cpu", "cuda"):
        raise RecipeError(f"--device {name}: cache-targets encodes on the CPU or a CUDA GPU; valid: auto, cpu, cuda, cuda:<index>")
    return device


def encoded_batches(representation, dataset, batch_size: int, num_workers: int, device: torch.device,
                    progress: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`(indices, targets)` for every item of `dataset` in order, targets as `representation.encode` returns them."""
    loader = DataLoader(_Indexed(dataset), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_present_items)
    bar = tqdm(total=len(dataset), desc="cache-targets", unit="img", file=sys.stderr, disable=not progress, mininterval=2)
    with bar:
        for indices, images, asked in loader:
            if len(indices):
                yield indices, representation.encode(images.to(device)).float().cpu()
            bar.update(asked)


class _Indexed(Dataset):
    """`(i, dataset[i])`: each item with its index, so items the data set skips leave no gap in the matching."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


def _present_items(pairs: list[tuple[int, Any]]) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(indices, images) of the items that are there (a data set may give None for an unreadable one), and the batch size asked."""
    present = [(index, item) for index, item in pairs if item is not None]
    indices = torch.tensor([index for index, _ in present], dtype=torch.int64)
    images = default_collate([item["image"] for _, item in present]) if present else None
    return indices, images, len(pairs)


def cache_targets(recipe: DictConfig, items_per_shard: int = 4096, batch_size: int | None = None,
                  device: str = "auto", progress: bool = True) -> Path:
    """Write the target cache `recipe.targets` for `recipe`; returns its folder. An existing matching cache is kept."""
    check_recipe_types(recipe)
    target = _device(device)  # a device this machine lacks is refused before anything is read or built
    directory = OmegaConf.select(recipe, "targets")
    if not directory:
        raise RecipeError(
            "cache-targets writes the cache into the folder named by targets=DIR, e.g. `unizoo cache-targets "
            "targets=caches/vae data.train_size=10000`; then `unizoo train targets=caches/vae data.train_size=10000` "
            "(the same overrides) trains from it"
        )
    if items_per_shard < 1:
        raise RecipeError(f"--items-per-shard must be at least 1, got {items_per_shard}")
    directory = Path(directory).expanduser()
    signature = targets_signature(recipe)
    manifest = read_manifest(directory)
    if manifest is not None:
        check_signature(directory, manifest, signature)  # another recipe's cache: refused, never overwritten
        TargetShards(directory)  # every shard there and every item in one
        log.info("targets: %s already holds this recipe's %d targets; nothing to do", directory, manifest["items"])
        return directory
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise RecipeError(f"targets={directory} exists and is not a target cache (no {directory / 'manifest.json'}); "
                          "name a new or empty folder")

    L.seed_everything(recipe.seed, workers=True, verbose=False)  # as train() does before building
    datamodule = instantiate(recipe.data, _convert_="all")
    representation = instantiate(recipe.representation, _convert_="all")
    # The whole command on the device asked for, its index kept (cuda:1): a representation that pretrains (tiny VAE,
    # CLIP) does it there, and `num_workers: auto` resolves for that device's kind, not for the machine's default.
    with loops_on(str(target)):
        representation.prepare(datamodule)  # the weights and normalisation training would use
        workers = loader_workers(OmegaConf.select(recipe, "data.num_workers", default=0) or 0)
    representation.to(target).eval()
    dataset = indexable_train_set(datamodule, f"cache-targets targets={directory}")
    batches = encoded_batches(representation, dataset, batch_size or recipe.data.batch_size, workers, target, progress)
    manifest = write_shards(directory, signature, batches, len(dataset), items_per_shard)
    log.info(
        "targets: cached all %d items of the training split (data.train_size=%s%s) as %s %s tokens in %d shard(s), "
        "%.1f MB on disk, at %s; train from them with `unizoo train targets=%s` and the same overrides",
        manifest["items"], OmegaConf.select(recipe, "data.train_size", default="-"),
        f"; {manifest['items'] - manifest['targets']} unreadable, skipped" if manifest["targets"] < manifest["items"] else "", "x".join(map(str, manifest["shape"])), manifest["dtype"], len(manifest["shards"]),
        manifest["bytes"] / 1e6, directory, directory,
    )
    return directory
