"""The study's figures (matplotlib, headless): score curves and FID / diversity bars, one line or bar per variant."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402

from unizoo.studies.results import UNTRAINED  # noqa: E402


def _mean_curve(seeds: list[list[dict[str, Any]]], x: str, y: str) -> tuple[list[float], list[float]]:
    """The curve averaged over seeds, point by point (seeds share their evaluation steps)."""
    length = min(len(points) for points in seeds)
    xs, ys = [], []
    for i in range(length):
        values = [points[i][y] for points in seeds if y in points[i]]
        if values:
            xs.append(statistics.fmean(points[i][x] for points in seeds))
            ys.append(statistics.fmean(values))
    return xs, ys


def plot_curves(curves: dict[str, list[list[dict[str, Any]]]], x: str, y: str, path: Path, xlabel: str,
                stops: dict[str, list[tuple[float, float, str]]] | None = None) -> Path | None:
    """``y`` against ``x`` (steps or training seconds), one line per variant (mean over its seeds).

    ``stops``: per variant, where each seed's stage trained until flat ended (steps, seconds, state): a
    filled marker where it was flat, a hollow one where it was still rising at its last step.
    """
    if not curves:
        return None
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, seeds in curves.items():
        xs, ys = _mean_curve(seeds, x, y)
        if x == "train_seconds":
            xs = [value / 60 for value in xs]
        (line,) = axis.plot(xs, ys, marker="o", markersize=3, label=f"{name} ({len(seeds)} seed{'s' * (len(seeds) > 1)})")
        for steps, seconds, state in (stops or {}).get(name, []):
            at = steps if x == "steps" else seconds / 60
            axis.axvline(at, color=line.get_color(), linestyle=":" if state == "flat" else "--", alpha=0.7, linewidth=1)
            axis.plot([at], [ys[-1] if ys else 0], marker="X" if state == "flat" else "o", markersize=8, color=line.get_color(),
                      markerfacecolor=line.get_color() if state == "flat" else "none")
    axis.set_xlabel(xlabel + ("; X = stopped flat, o = still rising at its last step" if stops else ""))
    axis.set_ylabel(y.replace("_", " "))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return path


def plot_bars(rows: list[dict[str, Any]], column: str, path: Path, ylabel: str, title: str = "") -> Path | None:
    """Per variant: the mean of ``column`` over seeds with its standard deviation, and the untrained value beside it."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] == "done" and isinstance(row.get(column), (int, float)):
            groups.setdefault(row["variant"], []).append(row)
    if not groups:
        return None
    names = list(groups)
    trained = [[r[column] for r in groups[n]] for n in names]
    untrained = [[r[UNTRAINED + column] for r in groups[n] if isinstance(r.get(UNTRAINED + column), (int, float))] for n in names]
    positions = range(len(names))
    figure, axis = plt.subplots(figsize=(max(5, 1.1 * len(names) + 2), 4.5))
    width = 0.38
    spread = [statistics.stdev(v) if len(v) > 1 else 0 for v in trained]
    axis.bar([p - width / 2 for p in positions], [statistics.fmean(v) for v in trained], width,
             yerr=spread if any(spread) else None, capsize=3, label="trained (± std over seeds)")
    if any(untrained):
        axis.bar([p + width / 2 for p in positions], [statistics.fmean(v) if v else 0 for v in untrained], width,
                 color="lightgray", edgecolor="gray", label="untrained")
    axis.set_xticks(list(positions), names, rotation=30, ha="right", fontsize=8)
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=9)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return path
