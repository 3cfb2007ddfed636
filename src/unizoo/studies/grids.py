"""The variants' samples of the same prompts side by side: one row per variant, one column per prompt."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib
import torch

from unizoo.images import to_uint8

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402


def side_by_side(samples: dict[str, Path], path: Path) -> Path | None:
    """``samples``: variant name -> its ``samples.pt`` (``{"prompts", "images"}``, the same prompts for all)."""
    loaded = {name: torch.load(file, map_location="cpu", weights_only=False) for name, file in samples.items() if file.is_file()}
    if not loaded:
        return None
    prompts = next(iter(loaded.values()))["prompts"]
    rows, columns = len(loaded), len(prompts)
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.1 + 1.6, rows * 1.15 + 0.6), squeeze=False)
    for r, (name, drawn) in enumerate(loaded.items()):
        if drawn["prompts"] != prompts:
            raise ValueError(f"{name} drew other prompts than the first variant: its samples are not comparable")
        for c, pixels in enumerate(to_uint8(drawn["images"])):
            axis = axes[r][c]
            axis.imshow(pixels, interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if r == 0:
                axis.set_title("\n".join(textwrap.wrap(prompts[c], 16)), fontsize=5)
            if c == 0:
                axis.set_ylabel(name.replace("+", "\n"), fontsize=6, rotation=0, ha="right", va="center")
    figure.tight_layout(pad=0.3)
    figure.savefig(path, dpi=150, bbox_inches="tight", pad_inches=0.05)
    plt.close(figure)
    return path
