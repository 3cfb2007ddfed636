"""results.md: one row per variant (cell), each value the mean +- standard deviation over its finished seeds.

The best mean of each result column is in bold (lowest for FID and time, highest
otherwise); untrained baselines and parameter counts are never bold. Columns come from
the rows (`unizoo.studies.results`), so a score an evaluator adds appears without an edit.
"""

from __future__ import annotations

import statistics
from typing import Any

from unizoo.studies.results import CONVERGED, CONVERGED_STATE, UNTRAINED, still_rising
from unizoo.studies.study import Study

LOWER_IS_BETTER = ("fid", "fid_clip", "train_minutes")
TEXT_COLUMNS = (CONVERGED,)
NEVER_BEST = ("total_params", "trainable_params", "search_nfe", "untrained_search_nfe")  # counts, not scores
THROUGHPUT_PREFIXES = ("images_per_s_", "train_seconds_", "trainable_params_")
BOOKKEEPING = ("total_params", "steps", "seconds_total")


def _numbers(rows: list[dict[str, Any]], column: str) -> list[float]:
    return [row[column] for row in rows if isinstance(row.get(column), (int, float)) and not isinstance(row.get(column), bool)]


def _format(column: str, value: float) -> str:
    if column.endswith(("params", "nfe")):
        return f"{value:,.0f}"
    if "fid" in column or column.endswith("minutes"):
        return f"{value:.2f}"
    if column.startswith("images_per_s"):
        return f"{value:.1f}"
    return f"{value:.3f}"


def _cell(column: str, values: list[float]) -> tuple[str, float | None]:
    if not values:
        return "–", None
    mean = statistics.fmean(values)
    text = _format(column, mean)
    if len(values) > 1:
        text += f" ± {_format(column, statistics.stdev(values))}"
    return text, mean


def _with_derived(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows plus the training time of all stages in minutes and the last stage's trainable parameters."""
    derived = []
    for row in rows:
        seconds = [v for k, v in row.items() if k.startswith("train_seconds_") and isinstance(v, (int, float))]
        trainable = [v for k, v in row.items() if k.startswith("trainable_params_")]
        extra = {"train_minutes": sum(seconds) / 60} if seconds else {}
        if trainable:
            extra["trainable_params"] = trainable[-1]
        derived.append({**row, **extra})
    return derived


def _words(rows: list[dict[str, Any]], column: str) -> str:
    """A text column (`converged`): each seed's value, once each, in seed order."""
    values = list(dict.fromkeys(str(row[column]) for row in rows if row.get(column)))
    return " / ".join(values) or "–"


def markdown_table(groups: dict[str, list[dict[str, Any]]], columns: list[str], titles: dict[str, str] | None = None) -> str:
    """One row per group (``name -> its rows``), mean +- std per column, the best mean in bold.

    Text columns (`converged`) list their values. A seed still rising at its `max_steps` is left
    out of every mean (its scores are no result); its `converged` entry says so.
    """
    titles = titles or {}
    results = {name: [row for row in rows if not still_rising(row)] for name, rows in groups.items()}
    cells = {name: {c: (_words(rows, c), None) if c in TEXT_COLUMNS else _cell(c, _numbers(results[name], c)) for c in columns}
             for name, rows in groups.items()}
    best = {}
    for column in columns:
        means = [cells[name][column][1] for name in groups if cells[name][column][1] is not None]
        # Nothing is best where every variant has the same value.
        if len(means) > 1 and max(means) > min(means) and not column.startswith(UNTRAINED) and column not in NEVER_BEST:
            best[column] = min(means) if column in LOWER_IS_BETTER else max(means)
    header = ["variant", "seeds", *[titles.get(c, c.replace("_", " ")) for c in columns]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, rows in groups.items():
        done = sum(row["status"] == "done" for row in rows)
        values = []
        for column in columns:
            text, mean = cells[name][column]
            values.append(f"**{text}**" if mean is not None and best.get(column) == mean else text)
        lines.append("| " + " | ".join([name, f"{done}/{len(rows)}", *values]) + " |")
    return "\n".join(lines)


SPACE_NAMES = {"shapes_classifier": "shapes classifier", "clip": "CLIP"}


def _features_line(features: dict[str, Any] | None) -> str:
    """`in the features of a classifier of the data's scene labels (held-out accuracy: ...)`."""
    if not features:
        return "in the run's feature space"
    space = features.get("headline")
    accuracy = (features.get(space) or {}).get("held_out_accuracy")
    if space == "shapes_classifier" and accuracy:
        return (f"in the features of a classifier of the shapes data's scene labels, which neither representation owns "
                f"(its held-out accuracy on {accuracy['images']} val images: scene {accuracy['scene']:.3f}, counts "
                f"{accuracy['counts']:.3f}, positions {accuracy['cells']:.3f})")
    return f"in the {SPACE_NAMES.get(space, space)} features"


def results_markdown(study: Study, rows: list[dict[str, Any]], command: str, features: dict[str, Any] | None = None) -> str:
    rows = _with_derived(rows)
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["variant"], []).append(row)
    done = [r for r in rows if r["status"] == "done"]
    present = {key for row in done for key in row}
    identity = {"variant", *study.axes, "seed", "status", "error"}
    ordered = [key for row in done for key in row]
    ordered = list(dict.fromkeys(ordered))
    scores = [k for k in ordered if k not in identity and not k.startswith(UNTRAINED) and not k.startswith(THROUGHPUT_PREFIXES)
              and k not in (*BOOKKEEPING, "train_minutes", "trainable_params", CONVERGED_STATE)]
    untrained = [k for k in ordered if k.startswith(UNTRAINED)]
    summary = [k for k in ("overall", "untrained_overall", CONVERGED, "fid", "untrained_fid", "fid_clip", "untrained_fid_clip",
                           "diversity", "untrained_diversity", "understanding_overall", "untrained_understanding_overall", "search_overall", "search_nfe")
               if k in present]
    summary += [k for k in ordered if k.startswith("images_per_s_")]
    summary += [k for k in ("train_minutes", "trainable_params", "total_params") if k in present]
    space = (features or {}).get("headline")
    named = {"fid": f"FID ({SPACE_NAMES.get(space, space)})" if space else "FID", "untrained_fid": "untrained FID",
             "fid_clip": "FID (CLIP)", "untrained_fid_clip": "untrained FID (CLIP)"}
    titles = {k: named.get(k, k.replace("images_per_s_", "images/s ").replace("untrained_", "untrained ").replace("_", " ")) for k in summary}
    failed = [r for r in rows if r["status"] != "done"]
    rising = sorted({r["variant"] for r in done if still_rising(r)})

    parts = [
        f"# Study `{study.name}`: {len(done)} of {len(rows)} variants done",
        "",
        f"Made by `{command}`. One row per variant: the mean ± standard deviation over its finished "
        "seeds (`seeds` = finished/planned); the best mean of a column is in **bold** (lowest FID and "
        "training time, highest otherwise). A difference smaller than the spread of the seeds is not a "
        "finding. Scores are after the last stage, `untrained` before any training.",
        "",
        "## Summary",
        "",
        "overall: the evaluator's overall score (mean of its categories, 0-1); converged: where a stage trained "
        "until its curve was flat stopped (`strategy.until_flat`), or that it was still rising at its last step "
        "(such a seed is left out of every mean: it is no result); FID: Frechet distance of the samples to the "
        f"val images {_features_line(features)} (lower = closer to real images); FID (CLIP): the same in the tiny "
        "CLIP's image features, which CLIP targets are trained to produce (it favours representation=clip); "
        "diversity: mean pairwise feature distance between draws of one prompt (0 = every draw the same); "
        "understanding overall: captions of held-out images scored against the truth; search overall: the overall score "
        "of the samples an inference-time search picked (evaluation.search), search nfe: the generator evaluations "
        "per prompt it spent; images/s: training "
        "throughput per stage; train minutes: training wall time of all stages, evaluations excluded.",
        "",
        *([f"**Still rising at their last step (no result):** {', '.join(rising)}.", ""] if rising else []),
        markdown_table(groups, summary, titles) if summary else "(no variant finished yet)",
        "",
        "## Every score after training",
        "",
        markdown_table(groups, scores) if scores else "(no variant finished yet)",
        "",
        "## Before training",
        "",
        markdown_table(groups, untrained) if untrained else "(no variant finished yet)",
    ]
    if failed:
        parts += ["", "## Not done", "", "| variant | seed | status | error |", "|---|---|---|---|"]
        parts += [f"| {r['variant']} | {r['seed']} | {r['status']} | {str(r['error']).replace('|', '/') or '–'} |" for r in failed]
    return "\n".join(parts) + "\n"
