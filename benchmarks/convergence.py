"""`python -m benchmarks.convergence STUDY_DIR [STUDY_DIR ...] --name NAME [--thresholds 0.2 0.3]`: how fast each cell learns.

Reads the folders `unizoo study` wrote (each variant's `metrics.json`: its curve of evaluator
scores against optimiser steps, `evaluation.every_n_steps` apart) and tabulates, per cell,
mean ± std over its finished seeds:

* the steps each needs to reach each threshold of the score (`--score`, the EMA weights'
  `overall` by default) from below, read off the curve by linear interpolation between its
  points, with how many seeds reached it ("2/2"); a seed that never did is left out of the mean;
* the speed-up over the cell that differs only in `--baseline` (e.g. `alignment=none`):
  the baseline's mean steps over the cell's, where both reached the threshold;
* the score at the last step, and at `--at` steps if given;
* the representation's round trip (the evaluator's score of decode(encode(x)) over that
  of x) before training and after it, where a stage trained the representation (REPA-E).

Several study folders can share one table (`python -m benchmarks.convergence runs/studies/repa
runs/studies/repa_e --name repa`): the REPA-E row beside the REPA cells. Cell names must not
repeat across them. Writes `<out>/<machine>/<name>.md`, `.json` and `.png` (the curves, mean
over seeds with the seeds' range shaded, thresholds dashed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402

from unizoo.studies.results import read_metrics  # noqa: E402
from unizoo.studies.status import read_status  # noqa: E402
from unizoo.studies.study import load_study  # noqa: E402
from unizoo.studies.variant import variant_folder  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def steps_to_reach(curve: list[tuple[float, float]], threshold: float) -> float | None:
    """The step at which the curve `[(steps, score), ...]` reaches `threshold` from below, interpolated; None if never.

    Points before the curve first falls below the threshold do not count: an untrained model can
    score above a low threshold by chance (random blobs read as shapes) and fall below it as it
    starts to learn, so reaching the threshold means climbing back to it. A curve that never is
    below it reaches it at its first point.
    """
    below = next((i for i, (_, score) in enumerate(curve) if score < threshold), None)
    if below is None:
        return curve[0][0] if curve else None
    for i in range(below + 1, len(curve)):
        steps, score = curve[i]
        if score >= threshold:
            before_steps, before_score = curve[i - 1]
            return before_steps + (threshold - before_score) / (score - before_score) * (steps - before_steps)
    return None


def score_at(curve: list[tuple[float, float]], steps: float) -> float | None:
    """The curve's score at `steps`, interpolated between its points; None outside the curve."""
    for (a, ya), (b, yb) in zip(curve, curve[1:]):
        if a <= steps <= b:
            return ya if b == a else ya + (steps - a) / (b - a) * (yb - ya)
    return curve[0][1] if curve and curve[0][0] == steps else None


def read_study(folder: Path, score: str, weights: str) -> dict[str, dict[str, Any]]:
    """Per cell of the study in `folder`: its choices and, per finished seed, its curve and round trips."""
    study = load_study(folder / "study.yaml")
    cells: dict[str, dict[str, Any]] = {}
    for variant in study.variants():
        where = variant_folder(folder, variant)
        metrics = read_metrics(where)
        if read_status(where).get("state") != "done" or not metrics or not metrics.get("curve"):
            continue
        curve = [(point["steps"], point[weights][score]) for point in metrics["curve"] if score in point.get(weights, {})]
        after = list((metrics.get("representation_after") or {}).values())
        cell = cells.setdefault(variant.cell.name, {"study": study.name, "choices": variant.cell.choices, "seeds": []})
        cell["seeds"].append({
            "seed": variant.seed,
            "curve": curve,
            "round_trip_before": metrics["representation"]["ratio"],
            "round_trip_after": after[-1]["ratio"] if after else None,
        })
    return cells


def _mean_std(values: list[float], digits: int) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summarise(cells: dict[str, dict[str, Any]], thresholds: list[float], baseline: str | None, at: int | None) -> dict[str, Any]:
    """The numbers of the table, per cell."""
    rows = {}
    for name, cell in cells.items():
        seeds = cell["seeds"]
        row = {
            "study": cell["study"], "choices": cell["choices"], "seeds": [s["seed"] for s in seeds],
            "final_steps": [s["curve"][-1][0] for s in seeds], "final": [s["curve"][-1][1] for s in seeds],
            "reached": {str(t): [steps_to_reach(s["curve"], t) for s in seeds] for t in thresholds},
            "round_trip_before": [s["round_trip_before"] for s in seeds],
            "round_trip_after": [s["round_trip_after"] for s in seeds if s["round_trip_after"] is not None],
        }
        if at is not None:
            row["at"] = [value for s in seeds if (value := score_at(s["curve"], at)) is not None]
        rows[name] = row
    if baseline:
        axis, _, choice = baseline.partition("=")
        for name, row in rows.items():
            if row["choices"].get(axis) in (None, choice):
                continue
            twin = {**row["choices"], axis: choice}
            base = next((n for n, r in rows.items() if r["choices"] == twin and r["study"] == row["study"]), None)
            if base is None:
                continue
            row["baseline"] = base
            row["speedup"] = {}
            for t in map(str, thresholds):
                mine = [v for v in row["reached"][t] if v is not None]
                theirs = [v for v in rows[base]["reached"][t] if v is not None]
                row["speedup"][t] = statistics.fmean(theirs) / statistics.fmean(mine) if mine and theirs and statistics.fmean(mine) > 0 else None
    return rows


def markdown(rows: dict[str, Any], thresholds: list[float], score: str, weights: str, at: int | None, command: str) -> str:
    head = ["cell", "seeds", f"{score} at the last step"]
    if at is not None:
        head.append(f"{score} at step {at}")
    head += [f"steps to {score} {t:g}" for t in thresholds]
    if any("speedup" in row for row in rows.values()):
        head += [f"speed-up to {t:g}" for t in thresholds]
    head += ["round trip before", "round trip after"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        n = len(row["seeds"])
        cells = [name, str(n), _mean_std(row["final"], 3) + f" (step {int(statistics.fmean(row['final_steps']))})"]
        if at is not None:
            cells.append(_mean_std(row["at"], 3))
        for t in thresholds:
            reached = [v for v in row["reached"][str(t)] if v is not None]
            cells.append(f"{_mean_std(reached, 0)} ({len(reached)}/{n})" if reached else f"not reached (0/{n})")
        if any("speedup" in r for r in rows.values()):
            for t in thresholds:
                value = row.get("speedup", {}).get(str(t))
                cells.append(f"{value:.2f}x vs {row['baseline']}" if value else "–")
        cells += [_mean_std(row["round_trip_before"], 3), _mean_std(row["round_trip_after"], 3) if row["round_trip_after"] else "(frozen)"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([
        f"Steps to reach the evaluator's `{score}` ({'EMA' if weights == 'generation' else 'trained'} weights) from below "
        "(an untrained score above a threshold does not count), read off each seed's curve by linear interpolation "
        "between its evaluations; mean ± std over the seeds that reached it "
        "(how many of the cell's seeds did, in parentheses). Speed-up: the baseline cell's mean steps over this cell's. "
        "Round trip: the evaluator's score of decode(encode(x)) over that of x, on the run's evaluation images.",
        "",
        *lines,
        "",
        f"Made by `{command}`.",
        "",
    ])


def plot(cells: dict[str, dict[str, Any]], thresholds: list[float], score: str, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, cell in cells.items():
        curves = [s["curve"] for s in cell["seeds"]]
        length = min(len(c) for c in curves)
        steps = [statistics.fmean(c[i][0] for c in curves) for i in range(length)]
        values = [[c[i][1] for c in curves] for i in range(length)]
        line = axis.plot(steps, [statistics.fmean(v) for v in values], marker="o", markersize=3,
                         label=f"{name} ({len(curves)} seed{'s' * (len(curves) > 1)})")[0]
        if len(curves) > 1:
            axis.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.15)
    for t in thresholds:
        axis.axhline(t, color="grey", linestyle="--", linewidth=0.8)
    axis.set_xlabel("optimiser steps")
    axis.set_ylabel(score.replace("_", " "))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", nargs="+", type=Path, help="study folders written by `unizoo study` (--out)")
    parser.add_argument("--name", required=True, help="the files' name: <out>/<machine>/<name>.{md,json,png}")
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.2, 0.3, 0.4], help="scores to reach")
    parser.add_argument("--score", default="overall", help="the evaluator's score (overall, strict_overall, ...)")
    parser.add_argument("--weights", choices=["generation", "generation_raw"], default="generation",
                        help="generation: the EMA weights (the reported score); generation_raw: the trained ones")
    parser.add_argument("--baseline", help="AXIS=CHOICE: the speed-up of each cell over its twin with this choice (e.g. alignment=none)")
    parser.add_argument("--at", type=int, help="also tabulate the score at this many steps (an equal budget)")
    parser.add_argument("--machine", help="results subfolder (default: this machine, as benchmarks.run names it)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    cells: dict[str, dict[str, Any]] = {}
    for folder in args.studies:
        if not (folder / "study.yaml").is_file():
            parser.error(f"{folder} is no study folder: it has no study.yaml (made by `unizoo study ... --out {folder}`)")
        found = read_study(folder, args.score, args.weights)
        repeated = set(found) & set(cells)
        if repeated:
            parser.error(f"cells {sorted(repeated)} appear in more than one study folder")
        cells.update(found)
    if not cells:
        parser.error(f"no finished variant with a curve in {', '.join(map(str, args.studies))} (set evaluation.every_n_steps)")

    if args.machine is None:
        import torch  # noqa: PLC0415

        from .report import machine_slug  # noqa: PLC0415

        args.machine = machine_slug(torch.device("cpu"))
    folder = args.out / args.machine
    folder.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.convergence " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = summarise(cells, args.thresholds, args.baseline, args.at)
    table = markdown(rows, args.thresholds, args.score, args.weights, args.at, command)
    (folder / f"{args.name}.md").write_text(f"# {args.name}\n\n{table}")
    (folder / f"{args.name}.json").write_text(json.dumps({"command": command, "thresholds": args.thresholds, "score": args.score,
                                                           "weights": args.weights, "cells": rows,
                                                           "curves": {n: c["seeds"] for n, c in cells.items()}}, indent=2))
    plot(cells, args.thresholds, args.score, folder / f"{args.name}.png")
    print(table)
    print(f"[convergence] wrote {folder / args.name}.md, .json, .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
