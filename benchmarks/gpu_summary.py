"""`python -m benchmarks.gpu_summary RESULTS_DIR`: the GPU check's verdict, from what `benchmarks/gpu_check.sh` wrote.

Reads `gpu_check/steps.tsv` (each step's status and time), the first run's `metrics.json` and the
benchmark tables in RESULTS_DIR, and writes `gpu_check.md` and `gpu_check.json` beside them: every
step, every row of the tables that did not run, and each GPU target of the project with the measured
value and whether it holds. A number that is missing (its step failed or ran out of time) is
reported as missing, never guessed: a table older than the check (`gpu_check/started`), an earlier
check's left in place by a step that failed, is not read.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from .tables import _table

# The GPU lines of the project's issue 25, checked against an H100/H200-class GPU.
TARGETS = {
    # Read as the rate the stage trains at: a compile is paid once per process, and the first-run line bounds
    # it; the stage's wall clock with the compile in it is the next row, held to the same goal, for comparison.
    "generation_images_per_s": (">=", 10_000, "the default recipe's generation stage, images/s while it trains "
                                "(after its compile, where it compiled)"),
    "generation_images_per_s_with_compile": (">=", 10_000, "the same stage's images/s over its whole wall clock, "
                                             "the compile included"),
    "first_run_s": ("<=", 90, "a first `unizoo train` with an empty cache, seconds"),
    "xl_mfu": (">=", 0.40, "unizoo at DiT-XL/2, batch 256, bf16: MFU of the measured matmul peak"),
    "xl_ratio": (">=", 1.2, "unizoo at DiT-XL/2 over diffusers' best row (best vs best)"),
}


# The tables the check's benchmark steps write, in the order they run.
TABLES = ("loop", "attention", "peer_dit", "peer_dit_xl", "variants")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def started(results: Path) -> float | None:
    """When the check began (seconds since the epoch, written by gpu_check.sh); None for a folder without it."""
    try:
        return float((results / "gpu_check" / "started").read_text())
    except (OSError, ValueError):
        return None


def table(results: Path, name: str) -> dict | None:
    """`<name>.json` as this check wrote it; None where it is absent, unreadable, or older than the check."""
    path = results / f"{name}.json"
    since = started(results)
    try:
        if since is not None and path.stat().st_mtime < since:
            return None
    except OSError:
        return None
    return _read_json(path)


def _row_label(row: dict) -> str:
    """A row as its table names it: peer and variant rows have a name; attention rows, a backend at a precision and length."""
    if row.get("name"):
        return str(row["name"])
    return " ".join(f"{key} {row[key]}" if key == "seq_len" else str(row[key])
                    for key in ("backend", "precision", "seq_len") if row.get(key) is not None) or "a row"


def rows_not_run(results: Path) -> tuple[list[dict], list[str]]:
    """The rows of this check's tables that did not run, and the tables it did not write.

    A benchmark records a row that failed or ran out of its time with the reason as the row's status and goes on
    to the next row, exiting 0: its step then reads "ok" while rows of it did not run. Skipped rows are listed too:
    the peer benchmark records a switch that raised as "skipped: <error>" (on a CPU, a switch that cannot run
    there), and on a GPU, where every switch should run, that is what a reader has to see; the other skips say
    why (xformers not installed, a row estimated past its memory or time). A peer table's failed loss check (the
    two models' losses not agreeing within its tolerance) is listed as well.
    """
    not_run, missing = [], []
    for name in TABLES:
        result = table(results, name)
        if result is None:
            missing.append(f"{name}.json")
            continue
        for row in result.get("rows") or []:
            status = row.get("status")
            if status is not None and status != "ok":
                not_run.append({"table": name, "row": _row_label(row), "status": str(status)})
        if result.get("partial"):  # the step stopped (its time limit) after writing the rows it had measured
            not_run.append({"table": name, "row": "the rest", "status": f"not run: {result['partial']}"})
        for check in result.get("loss_checks") or []:
            if not check.get("passed", True):
                not_run.append({"table": name, "row": str(check.get("variant")),
                                 "status": f"loss check failed: max rel diff {check.get('max_rel_diff')} "
                                           f"above its tolerance {check.get('tolerance_rel')}"})
    return not_run, missing


def steps(results: Path) -> list[dict]:
    path = results / "gpu_check" / "steps.tsv"
    if not path.is_file():
        return []
    with path.open() as file:
        return [{"step": row["step"], "status": row["status"], "seconds": int(row["ms"]) / 1000, "limit_s": int(row["limit_s"])}
                for row in csv.DictReader(file, delimiter="\t")]


def measured(results: Path, step_rows: list[dict]) -> dict:
    values: dict = {}
    metrics = _read_json(results / "gpu_check" / "first_run" / "metrics.json")
    first_run = next((row for row in step_rows if row["step"] == "first_run"), None)
    if metrics:
        generation = metrics.get("training", {}).get("generation", {})
        wall = generation.get("images_per_s")  # the stage's wall clock, compiling included
        after = generation.get("images_per_s_after_compile")  # absent where the generator ran eager: then the same
        values["generation_images_per_s"] = after if after is not None else wall
        values["generation_images_per_s_with_compile"] = wall
        values["generation_compile_s"] = generation.get("compile_seconds")
        values["first_run_train_seconds_total"] = metrics.get("seconds_total")
        values["first_run_overall"] = metrics.get("generation", {}).get("generation", {}).get("overall")
    if first_run and first_run["status"] == "ok":
        values["first_run_s"] = first_run["seconds"]  # the whole command, start-up and pretraining included
    loop = table(results, "loop")
    if loop and loop.get("rows"):
        row = loop["rows"][0]
        values["loop_overhead"] = row.get("overhead")
        values["loop_overhead_low"], values["loop_overhead_high"] = row.get("overhead_low"), row.get("overhead_high")
        values["loop_step_parts"] = row.get("step_parts") or []
        values["loop_bare_images_per_s"] = row.get("bare_images_per_s")
        values["loop_eager_ceiling_images_per_s"] = row.get("eager_ceiling_images_per_s")
        values["loop_operators_per_step"] = row.get("operators_per_step")
        values["loop_generator_compiled"] = row.get("generator_compiled")
    peer = table(results, "peer_dit_xl")
    if peer and peer.get("best_vs_best"):
        best = peer["best_vs_best"]
        values["xl_mfu"] = (best.get("unizoo") or {}).get("mfu")
        values["xl_ratio"] = best.get("ratio")
        values["xl_unizoo_best"] = (best.get("unizoo") or {}).get("variant")
        values["xl_diffusers_best"] = (best.get("peer") or {}).get("variant")
    return values


def verdicts(values: dict) -> list[dict]:
    rows = []
    for key, (relation, target, what) in TARGETS.items():
        value = values.get(key)
        holds = None if value is None else (value >= target if relation == ">=" else value <= target)
        rows.append({"target": key, "what": what, "relation": relation, "goal": target, "measured": value, "holds": holds})
    return rows


def _loop_line(values: dict) -> str:
    """Where the default recipe's step goes on this GPU: its loop, its kernels, or the host's dispatching."""
    if values.get("loop_eager_ceiling_images_per_s") is None:
        return "- default recipe's step (`loop.md`): missing (its step did not finish)"
    generator = "compiled" if values.get("loop_generator_compiled") else "eager"
    blocks = ("" if values.get("loop_overhead_low") is None else
              f" (blocks {100 * values['loop_overhead_low']:.1f}% to {100 * values['loop_overhead_high']:.1f}%)")
    line = (f"- default recipe's step (`loop.md`, the generator and language model {generator}): bare step "
            f"{values['loop_bare_images_per_s']:,.0f} images/s, loop overhead {100 * values['loop_overhead']:.1f}%{blocks}; "
            f"{values['loop_operators_per_step']} operators per eager step; the step on one image allows at most "
            f"{values['loop_eager_ceiling_images_per_s']:,.0f} images/s (batch / the bare step on one image)")
    parts = sorted(values["loop_step_parts"], key=lambda p: p["one_image_ms"], reverse=True)
    if parts:  # which part pays the host's cost: what compiling it (or moving it off the main thread) would buy
        line += "\n- its parts on one image, costliest first: " + "; ".join(
            f"{p['part']} {p['one_image_ms']:.2f} ms ({p['operators']} operators)" for p in parts)
    return line


def _compile_line(values: dict) -> str:
    """Whether the first run's generator and language model were compiled, and the stage's rate with and without that."""
    if values.get("generation_compile_s") is None:
        return "- first run's generator and language model: eager (no compile time in its metrics.json)"
    return (f"- first run's generator and language model: compiled in {values['generation_compile_s']:.1f} s; its stage trained at "
            f"{values['generation_images_per_s']:,.0f} images/s after that, "
            f"{values['generation_images_per_s_with_compile']:,.0f} images/s over its wall clock with the compile")


def _rows_markdown(not_run: list[dict], missing: list[str]) -> str:
    """The rows of the benchmark tables that did not run, as a table, and the tables this check did not write."""
    lines = []
    if not_run:
        failed = sum(not p["status"].startswith("skipped") for p in not_run)
        lines.append(f"Rows of the tables that did not run or did not pass: {failed} failed, {len(not_run) - failed} skipped "
                     "(a benchmark records such a row with its reason and goes on, so its step still reads ok):")
        lines.append(_table(["table", "row", "status"],
                            [[p["table"], p["row"], p["status"].replace("|", "/").replace("\n", " ")] for p in not_run]))
    else:
        lines.append("Every row of the tables this check wrote ran.")
    if missing:
        lines.append("Tables this check did not write (their step failed or ran out of time; an earlier check's, if any, "
                     "was not read): " + ", ".join(f"`{name}`" for name in missing) + ".")
    return "\n\n".join(lines)


def summary_markdown(step_rows: list[dict], verdict_rows: list[dict], values: dict, machine: str,
                     not_run: list[dict] = (), missing: list[str] = ()) -> str:
    step_table = _table(["step", "status", "seconds", "limit (s)"],
                        [[r["step"], r["status"], f"{r['seconds']:.1f}", str(r["limit_s"])] for r in step_rows])

    def shown(value) -> str:
        if value is None:
            return "missing (its step did not finish)"
        if isinstance(value, float):
            return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"  # 38,000 images/s, not 3.8e+04
        return str(value)

    target_table = _table(["target", "goal", "measured", "holds"],
                          [[r["what"], f"{r['relation']} {r['goal']:g}", shown(r["measured"]),
                            "–" if r["holds"] is None else ("yes" if r["holds"] else "**no**")] for r in verdict_rows])
    extra = [f"- first run's generation score (EMA, 64 prompts): {shown(values.get('first_run_overall'))}",
             _compile_line(values),
             f"- DiT-XL/2 best rows: unizoo `{values.get('xl_unizoo_best')}`, diffusers `{values.get('xl_diffusers_best')}`",
             _loop_line(values)]
    return "\n\n".join([
        f"### The GPU check on {machine} (`bash benchmarks/gpu_check.sh`)",
        "Every step ran under its own time limit; logs are in `gpu_check/<step>.log`, tables beside this file "
        "(`loop.md`, `attention.md`, `peer_dit.md`, `peer_dit_xl.md`, `variants.md`).",
        step_table, _rows_markdown(list(not_run), list(missing)), target_table, "\n".join(extra),
    ]) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python -m benchmarks.gpu_summary RESULTS_DIR (a folder gpu_check.sh wrote)", file=sys.stderr)
        return 2
    results = Path(argv[0])
    step_rows = steps(results)
    values = measured(results, step_rows)
    verdict_rows = verdicts(values)
    not_run, missing = rows_not_run(results)
    (results / "gpu_check.json").write_text(json.dumps({"steps": step_rows, "rows_not_run": not_run, "tables_not_written": missing,
                                                        "measured": values, "targets": verdict_rows}, indent=2) + "\n")
    markdown = summary_markdown(step_rows, verdict_rows, values, results.name, not_run, missing)
    (results / "gpu_check.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
