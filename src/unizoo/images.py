"""Saving images and labelled sample grids as PNG."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """`(B, 3, H, W)` in [-1, 1] -> `(B, H, W, 3)` uint8."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def load_images(paths: Sequence[Path], size: int) -> tuple[torch.Tensor, list[Path], list[tuple[Path, str]]]:
    """Images `(B, 3, size, size)` in [-1, 1] from files; unreadable files are skipped and reported, not fatal."""
    tensors, loaded, skipped = [], [], []
    for path in paths:
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32)
        except (OSError, ValueError) as error:
            skipped.append((path, str(error) or type(error).__name__))
            continue
        tensors.append(torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1)
        loaded.append(path)
    images = torch.stack(tensors) if tensors else torch.empty(0, 3, size, size)
    return images, loaded, skipped


def save_images(images: torch.Tensor, directory: Path, stem: str = "") -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, pixels in enumerate(to_uint8(images)):
        path = directory / f"{stem}{i:03d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def save_grid(images: torch.Tensor, path: Path, captions: Sequence[str] | None = None, columns: int = 8) -> Path:
    """A grid of images, each titled with its caption, as one PNG (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    pixels = to_uint8(images)
    rows = -(-len(pixels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.3, rows * 1.55), squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index < len(pixels):
            axis.imshow(pixels[index], interpolation="nearest")
            if captions is not None:
                axis.set_title("\n".join(textwrap.wrap(captions[index], 18)), fontsize=5)
    figure.tight_layout(pad=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    # "tight" grows the canvas to the titles: with one row, tight_layout alone clipped
    # the first line of two-line captions.
    figure.savefig(path, dpi=150, bbox_inches="tight", pad_inches=0.05)
    plt.close(figure)
    return path
