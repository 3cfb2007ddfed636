"""Each variant's metrics.json flattened to one row, generically: whatever the evaluators return becomes a column.

A row holds the variant's choices and seed, its status (and error), then, for a variant
that finished, the scores after its last stage and before training:

    <key>                    every float the generation evaluator returns (overall, the
                             categories, and any key an evaluator adds later)
    understanding_<key>      every float of the understanding score (backbones that read images)
    search_<key>             every float of the searched samples' scores (evaluation.search)
    fid, diversity, ...      every other float score of the evaluation
    untrained_<column>       the same columns before training
    images_per_s_<stage>, train_seconds_<stage>, trainable_params_<stage>   per stage
    total_params, steps, seconds_total
    converged, converged_state   a stage trained until flat: "flat at step S" or "still rising at
                             step N" (`strategy.until_flat`); a still-rising cell is no result
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from unizoo.studies.status import read_status
from unizoo.studies.study import Study, Variant
from unizoo.studies.variant import RUN_DIR, variant_folder
from unizoo.training.until_flat import FLAT, RISING

UNTRAINED = "untrained_"
PENDING = "pending"
CONVERGED, CONVERGED_STATE = "converged", "converged_state"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def flatten_scores(scores: dict[str, Any]) -> dict[str, float]:
    """One evaluation's scores: generation keys bare, understanding keys prefixed, other floats as they are."""
    columns = {}
    for key, value in scores.get("generation", {}).items():
        if isinstance(value, float):
            columns[key] = value
    for key, value in scores.get("understanding", {}).items():
        if isinstance(value, float):
            columns[f"understanding_{key}"] = value
    for key, value in scores.get("search", {}).items():  # evaluation.search: the searched samples' scores
        if isinstance(value, float):
            columns[f"search_{key}"] = value
    for key, value in scores.items():
        if key not in ("generation", "understanding") and isinstance(value, float):
            columns[key] = value
    return columns


def read_metrics(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / RUN_DIR / "metrics.json").read_text())
    except (OSError, ValueError):
        return None


def variant_row(variant: Variant, folder: Path) -> dict[str, Any]:
    status = read_status(folder)
    row: dict[str, Any] = {
        "variant": variant.cell.name, **variant.cell.choices, "seed": variant.seed,
        "status": status.get("state") or PENDING, "error": status.get("error") or "",
    }
    metrics = read_metrics(folder)
    if row["status"] != "done" or not metrics or not metrics.get("training"):
        return row
    stages = list(metrics["training"])
    row.update(flatten_scores(metrics[stages[-1]]))
    start = "untrained" if "untrained" in metrics else "start"
    row.update({UNTRAINED + key: value for key, value in flatten_scores(metrics.get(start, {})).items()})
    for stage, record in metrics["training"].items():
        row[f"images_per_s_{stage}"] = record.get("images_per_s")
        row[f"train_seconds_{stage}"] = record.get("train_seconds")
        row[f"trainable_params_{stage}"] = record.get("trainable_params")
    row["total_params"] = metrics["training"][stages[-1]].get("total_params")
    row["steps"] = sum(record.get("steps", 0) for record in metrics["training"].values())
    row["seconds_total"] = metrics.get("seconds_total")
    converged = metrics.get("converged") or {}
    if converged:
        row[CONVERGED] = "; ".join(f"{verdict['state']} at step {verdict['step']}" + (f" ({stage})" if len(converged) > 1 else "")
                                   for stage, verdict in converged.items())
        row[CONVERGED_STATE] = RISING if any(v["state"] == RISING for v in converged.values()) else FLAT
    return row


def still_rising(row: dict[str, Any]) -> bool:
    """A variant whose curve was still rising at `max_steps`: reported, never taken as a result."""
    return row.get(CONVERGED_STATE) == RISING


def feature_spaces(out: Path, variants: list[Variant]) -> dict[str, Any] | None:
    """What FID and diversity were measured in (metrics.json "features"), from the first finished variant."""
    for variant in variants:
        metrics = read_metrics(variant_folder(out, variant))
        if metrics and metrics.get("features"):
            return metrics["features"]
    return None


def stops(out: Path, variants: list[Variant]) -> dict[str, list[tuple[float, float, str]]]:
    """Each cell's stops of stages trained until flat, per finished seed: (steps across stages, training seconds, state)."""
    found: dict[str, list[tuple[float, float, str]]] = {}
    for variant in variants:
        folder = variant_folder(out, variant)
        metrics = read_metrics(folder)
        if read_status(folder).get("state") != "done" or not metrics:
            continue
        for stage, verdict in (metrics.get("converged") or {}).items():
            ends = [p for p in metrics.get("curve", []) if p.get("phase") == stage]
            if ends:
                found.setdefault(variant.cell.name, []).append((ends[-1]["steps"], ends[-1]["train_seconds"], verdict["state"]))
    return found


def collect(out: Path, variants: list[Variant]) -> list[dict[str, Any]]:
    return [variant_row(variant, variant_folder(out, variant)) for variant in variants]


def curves(out: Path, variants: list[Variant]) -> dict[str, list[list[dict[str, Any]]]]:
    """Each cell's score curves (metrics.json "curve"), one list of points per finished seed."""
    found: dict[str, list[list[dict[str, Any]]]] = {}
    for variant in variants:
        folder = variant_folder(out, variant)
        metrics = read_metrics(folder)
        if read_status(folder).get("state") == "done" and metrics and metrics.get("curve"):
            points = [{"steps": p["steps"], "train_seconds": p["train_seconds"], **flatten_scores(p)} for p in metrics["curve"]]
            found.setdefault(variant.cell.name, []).append(points)
    return found


def columns(rows: list[dict[str, Any]], study: Study) -> list[str]:
    """Identity columns first, then every other column in the order rows first show it."""
    head = ["variant", *study.axes, "seed", "status", "error"]
    rest: list[str] = []
    for row in rows:
        rest += [key for key in row if key not in head and key not in rest]
    return head + rest


def write_csv(path: Path, rows: list[dict[str, Any]], study: Study) -> Path:
    names = columns(rows, study)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=names, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return path
