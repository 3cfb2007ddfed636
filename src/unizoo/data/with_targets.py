"""Training from pre-extracted targets (`targets=DIR`): every training item also carries its `"target"`.

The target is looked up by the item's index in the training split, the same index the
sampler hands the data set, so shuffling, data-parallel sharding and a resumed run's
skipped batches all stay matched to the right targets. Images and captions stay in the
item: the understanding loss and evaluation still need them; only the generator's
target comes from the cache.

Works with any data module whose training loader reads `dataset("train")`, a map-style
data set (the agreed data-module interface: shapes, folder); a streamed training set
(webdataset) has no item index to match on and is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sized
from functools import partial
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from unizoo.data.target_shards import TargetShards, check_signature, targets_signature
from unizoo.errors import RecipeError


class DatasetView(Dataset):
    """Another data set's items with `added(i)` in each; what the view does not define is the base's.

    The training split is read for more than its items (the shapes data's `scene(i)`, which
    the shapes classifier learns from and which decides `evaluation.features: auto`), so a
    view must not hide it. Dunder names are not passed on: the loader asks
    `hasattr(dataset, "__getitems__")`, and the base's would return items without what the
    view adds.
    """

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getattr__(self, name: str) -> Any:
        # Only called for what the view lacks; `base` itself is missing while a pickled view is restored.
        if name == "base" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def added(self, index: int) -> dict[str, Any]:
        """What the view adds to item `index`."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = self.base[index]
        # None: an item the data set skips (unreadable), whose loader's collate drops it; nothing is added to it.
        return None if item is None else {**item, **self.added(index)}

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any] | None]:
        # The base's batched draw where it has one (shapes: a third of a batch's time saved).
        items = self.base.__getitems__(indices) if hasattr(self.base, "__getitems__") else [self.base[i] for i in indices]
        return [None if item is None else {**item, **self.added(i)} for item, i in zip(items, indices, strict=True)]


class TargetsDataset(DatasetView):
    """`base[i]` plus `"target"`: item i's cached representation tokens."""

    def __init__(self, base: Dataset, targets: TargetShards) -> None:
        super().__init__(base)
        self.targets = targets

    def added(self, index: int) -> dict[str, Any]:
        return {"target": self.targets[index]}


class TrainSplitWrapped:
    """Stands in for a data module's `dataset` method: the train split through `wrap`, other splits as they were.

    A picklable object rather than a closure (with `wrap` a class or a partial of one): spawned
    DDP workers (trainer=ddp_cpu) receive the data module pickled.
    """

    def __init__(self, datamodule: L.LightningDataModule, wrap: Callable[[Dataset], Dataset]) -> None:
        self.datamodule, self.wrap = datamodule, wrap

    def __call__(self, split: str) -> Dataset:
        base = type(self.datamodule).dataset(self.datamodule, split)
        return self.wrap(base) if split == "train" else base


def indexable_train_set(datamodule: L.LightningDataModule, what: str) -> Dataset:
    """The data module's map-style training set; a `RecipeError` starting with `what` if it has none."""
    name = type(datamodule).__name__
    try:
        train = type(datamodule).dataset(datamodule, "train")
    except (AttributeError, KeyError, NotImplementedError, ValueError) as error:
        raise RecipeError(f"{what}: the data module {name} has no indexable training set ({error}); pre-extracted "
                          "targets are matched to items by index, so they need a map-style data set") from None
    if not isinstance(train, Sized) or not hasattr(train, "__getitem__"):
        raise RecipeError(f"{what}: the data module {name} streams its training set, so there is no item index "
                          "to match targets on; train without targets=")
    return train


def attach_cached_targets(datamodule: L.LightningDataModule, recipe: DictConfig) -> TargetShards | None:
    """With `targets=DIR` in `recipe`, make `datamodule`'s training batches carry `"target"`; else nothing.

    Raises (before anything is trained) for a missing cache, one made for another
    representation or data recipe, or a data module without an indexable training set.
    """
    directory = OmegaConf.select(recipe, "targets")
    if not directory:
        return None
    targets = TargetShards(directory)
    check_signature(targets.directory, targets.manifest, targets_signature(recipe))
    train = indexable_train_set(datamodule, f"targets={directory}")
    if len(train) != len(targets):
        raise RecipeError(f"targets={directory}: the cache holds {len(targets)} items, the training set {len(train)}")
    datamodule.dataset = TrainSplitWrapped(datamodule, partial(TargetsDataset, targets=targets))
    loader = datamodule.train_dataloader()
    if not isinstance(loader.dataset, TargetsDataset):
        del datamodule.dataset
        raise RecipeError(f"targets={directory}: the data module {type(datamodule).__name__} builds its training loader without "
                          "dataset('train'), so its batches could not carry the cached targets")
    return targets
