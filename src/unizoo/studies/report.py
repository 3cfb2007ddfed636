"""Everything a study writes into its folder from its variants' runs.

    results.csv              one row per variant and seed (unizoo.studies.results)
    results.md               one row per variant, mean +- std over seeds, best in bold
    overall_vs_steps.png     the evaluator's overall score against optimiser steps, a line per variant (where a
                             stage trained until flat stopped: a marker, hollow where it was still rising)
    overall_vs_time.png      the same against training wall time
    fid.png, fid_clip.png, diversity.png   bars per variant (std over seeds) beside the untrained value
    samples.png              every variant's samples of the same prompts, side by side
"""

from __future__ import annotations

from pathlib import Path

from unizoo.studies.grids import side_by_side
from unizoo.studies.plots import plot_bars, plot_curves
from unizoo.studies.results import collect, curves, feature_spaces, stops, write_csv
from unizoo.studies.status import read_status
from unizoo.studies.study import Study, Variant
from unizoo.studies.table import SPACE_NAMES, results_markdown
from unizoo.studies.variant import SAMPLES_FILE, variant_folder

COMMAND_FILE = "command.txt"


def _command(out: Path) -> str:
    """The last command that ran the study (command.txt keeps one line per run)."""
    try:
        lines = [line for line in (out / COMMAND_FILE).read_text().splitlines() if line and not line.startswith("#")]
    except OSError:
        return "unizoo study"
    return lines[-1] if lines else "unizoo study"


def write_report(out: Path, study: Study, variants: list[Variant]) -> dict[str, Path]:
    rows = collect(out, variants)
    written = {"csv": write_csv(out / "results.csv", rows, study)}
    markdown = out / "results.md"
    markdown.write_text(results_markdown(study, rows, _command(out), feature_spaces(out, variants)))
    written["markdown"] = markdown
    curve, stopped = curves(out, variants), stops(out, variants)
    space = (feature_spaces(out, variants) or {}).get("headline", "clip")
    figures = {
        "overall_vs_steps": plot_curves(curve, "steps", "overall", out / "overall_vs_steps.png", "optimiser steps (all stages)", stopped),
        "overall_vs_time": plot_curves(curve, "train_seconds", "overall", out / "overall_vs_time.png",
                                       "training wall time (minutes, evaluations excluded)", stopped),
        "fid": plot_bars(rows, "fid", out / "fid.png", "FID",
                         f"Frechet distance to val images in {SPACE_NAMES.get(space, space)} features (lower = closer)"),
        "fid_clip": plot_bars(rows, "fid_clip", out / "fid_clip.png", "FID (CLIP)",
                              "Frechet distance to val images in the tiny CLIP's features (favours CLIP targets)"),
        "diversity": plot_bars(rows, "diversity", out / "diversity.png", "diversity",
                               "mean pairwise feature distance between draws of one prompt (0 = all the same)"),
    }
    # The first finished seed of each cell: the same prompts and noise for every variant.
    samples: dict[str, Path] = {}
    for variant in variants:
        folder = variant_folder(out, variant)
        if variant.cell.name not in samples and read_status(folder).get("state") == "done":
            samples[variant.cell.name] = folder / SAMPLES_FILE
    figures["samples"] = side_by_side(samples, out / "samples.png")
    written.update({name: path for name, path in figures.items() if path is not None})
    return written
