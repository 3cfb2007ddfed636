"""Torch data set and Lightning data module for the procedurally drawn shapes data set.

Every item is drawn on the fly from its own seed ``[seed, split_index, i]``: random access,
no storage, identical across processes, workers and runs.
"""

from __future__ import annotations

import inspect
from typing import Annotated, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from unizoo.config.recipe_types import AtLeast
from unizoo.data import captions
from unizoo.data.sampler import ResumableSampler, batches_trained
from unizoo.data.scene import Scene
from unizoo.data.shapes import draw_scene, sample_scene
from unizoo.runtime.accelerator import AUTO_WORKERS, loader_options

SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}


class ShapesDataset(Dataset):
    """``size`` items of one split; item ``i`` is ``{"image": float [3, H, W] in [-1, 1], "caption": str}``."""

    def __init__(self, split: str, size: int, image_size: int = 32, seed: int = 0) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLITS)}")
        self.split, self.size, self.image_size, self.seed = split, int(size), int(image_size), int(seed)

    def __len__(self) -> int:
        return self.size

    def scene(self, i: int) -> Scene:
        """The scene behind item ``i`` (its ground truth objects and caption)."""
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for {self.split} split of size {self.size}")
        rng = np.random.default_rng([self.seed, SPLITS[self.split], int(i)])
        return sample_scene(rng, self.image_size)

    def image(self, scene: Scene) -> torch.Tensor:
        """``scene`` drawn as ``[3, H, W]`` in [-1, 1]."""
        pixels = np.array(draw_scene(scene, self.image_size))  # [H, W, 3] uint8, writable copy for torch
        return torch.from_numpy(pixels).permute(2, 0, 1).float().div_(127.5).sub_(1.0)

    def __getitem__(self, i: int) -> dict:
        scene = self.scene(i)
        return {"image": self.image(scene), "caption": scene.caption}

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """A batch's items at once (the loader calls this when it exists): the same values as
        ``[self[i] for i in indices]``, converted to float in one tensor operation instead of one
        per image, which on the CPU is a third of the time a batch takes to draw."""
        scenes = [self.scene(int(i)) for i in indices]
        pixels = np.stack([np.asarray(draw_scene(scene, self.image_size)) for scene in scenes])  # [B, H, W, 3] uint8
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        return [{"image": image, "caption": scene.caption} for image, scene in zip(images, scenes)]


class ShapesDataModule(L.LightningDataModule):
    """Train/val/test splits of the shapes data set; batches are ``{"image": [B, 3, H, W], "caption": list[str]}``."""

    has_exact_evaluator = True  # captions follow a grammar that unizoo.eval.geneval checks against the pixels

    def __init__(
        self,
        image_size: Annotated[int, "32 or 64 for the shapes data"] = 32,
        batch_size: Annotated[int, AtLeast(1)] = 64,
        train_size: int = 50_000,
        val_size: int = 1_000,
        test_size: int = 1_000,
        seed: int = 0,
        num_workers: int | Literal["auto"] = "auto",
    ) -> None:
        super().__init__()
        # Hand Lightning our frame (never bound to a local, which its f_locals snapshot would capture):
        # by default it fetches the frame through a local that references its own frame, a cycle that
        # keeps the *caller's* locals (e.g. loaders with live workers) alive until the next gc pass,
        # where worker shutdown then stalls for seconds.
        self.save_hyperparameters(frame=inspect.currentframe())
        self.image_size, self.batch_size, self.seed, self.num_workers = image_size, batch_size, seed, num_workers
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.datasets: dict[str, ShapesDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        # Cheap (no data is materialised), so every split is always available.
        for split, size in self.sizes.items():
            if split not in self.datasets:
                self.datasets[split] = ShapesDataset(split, size, self.image_size, self.seed)

    def dataset(self, split: str) -> ShapesDataset:
        self.setup()
        return self.datasets[split]

    def _loader(self, split: str, train: bool) -> DataLoader:
        sampler, generator = None, None
        if train:
            # Shuffled per epoch from `seed`, this process's share under data parallelism, and
            # continuing where a resumed fit left off (its trainer's restored step).
            sampler = ResumableSampler(len(self.dataset(split)), seed=self.seed)
            sampler.start_after(batches_trained(self.trainer), self.batch_size)
            # The loader draws each iterator's base seed from this, not from the global RNG.
            generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=train,
            generator=generator,
            # num_workers: auto gives the training loader workers where the run is on a GPU; the val split
            # is read a few dozen items at a time, where starting workers would cost more than it saves.
            **loader_options(self.num_workers if train or self.num_workers != AUTO_WORKERS else 0),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def prompts(self, split: str = "val", n: int = 64) -> list[str]:
        """The first ``n`` captions of ``split``: fixed prompts for sample grids and evaluation."""
        ds = self.dataset(split)
        return [ds.scene(i).caption for i in range(min(n, len(ds)))]

    def vocabulary(self) -> list[str]:
        """Every word a caption can contain, sorted."""
        return captions.vocabulary()

    def skipped(self) -> dict[str, int]:
        """Reason -> samples skipped: drawn data has no bad samples."""
        return {}
