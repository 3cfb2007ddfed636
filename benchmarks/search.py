"""`python -m benchmarks.search RUN [RUN ...] [--budgets 1 2 4 8] [--quick]`: the evaluator's score against sampling
compute when a trained run searches over initial noises (Ma et al., arXiv 2501.09732), per search method and verifier.

For each run directory (trained with a vision encoder, e.g. `unizoo train strategy=joint`, so
that it can verify itself) and each noise `--seeds`, every method (`random`, `zero_order`) runs
with every verifier (`oracle`, `agreement`, `self`) at the largest budget, recording its best
images after each smaller budget on the way (`unizoo.eval.search`: the same as a run of that
budget). Each recorded set is scored by the shapes evaluator on `--prompts` val prompts. The
compute is the generator's function evaluations per prompt (NFE), counted. Beside them, the
baseline the paper compares search with: plain sampling with more Euler steps at the same NFE
(`steps x budget`).

The `oracle` verifier *is* the evaluator: its rows say how far a search can push the score when
the judge is exact, not what a deployable verifier does. `self` is the model's own understanding
path (it captions its sample and the caption is compared with the prompt).

Cost: each method x verifier samples the budget's candidates for every prompt (6 x 8 = 48 sampler
runs over the prompts at the defaults), the baseline 1 + 2 + 4 + 8 = 15 runs' worth of steps; at
the defaults (128 prompts, 20 steps, the default recipe's model) about 13 min per trained run on
2 CPU cores, estimated from counted FLOPs and the studies' evaluation times.

Writes `<out>/<machine>/search.{json,md,png}` (`search-quick.*` for --quick): a row per
(method, verifier, budget) with the score mean ± std over runs x seeds, and the plot of overall
against NFE, one line per method and verifier.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from .report import environment, machine_slug

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
METHODS = ("random", "zero_order")
VERIFIERS = ("oracle", "agreement", "self")
SCORES = ("overall", "strict_overall")


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}


def measure_run(run_dir: Path, args) -> list[dict]:
    """Every (method, verifier, budget) point and the steps baseline, for one trained run and every seed."""
    from hydra.utils import instantiate  # noqa: PLC0415

    from unizoo.eval.geneval import evaluate  # noqa: PLC0415
    from unizoo.eval.search import search  # noqa: PLC0415
    from unizoo.eval.verifiers import build_verifier  # noqa: PLC0415
    from unizoo.training.runs import load_run  # noqa: PLC0415

    recipe, model = load_run(run_dir)
    datamodule = instantiate(recipe.data, _convert_="all")
    datamodule.setup("fit")
    prompts = datamodule.prompts("val", args.prompts)
    steps = args.steps
    points = []
    for name in args.verifiers:
        verifier = build_verifier(name, model, recipe, datamodule)
        for method in args.methods:
            for seed in args.seeds:
                start = time.perf_counter()
                result = search(model, prompts, verifier, method, max(args.budgets), steps, args.guidance, seed,
                                args.step, args.neighbours, record=args.budgets)
                for budget in sorted(args.budgets):
                    images, verified = result.recorded[budget]
                    scores = evaluate(prompts, images)
                    points.append({"run": str(run_dir), "seed": seed, "method": method, "verifier": name, "budget": budget,
                                   "nfe": result.nfe(budget), "steps": steps, "verifier_score": float(verified.mean()),
                                   **{key: scores[key] for key in SCORES}})
                print(f"[search] {run_dir} seed {seed} {method} + {name}: budget {max(args.budgets)} in "
                      f"{time.perf_counter() - start:.0f} s, overall {points[-len(args.budgets)]['overall']:.3f} -> "
                      f"{points[-1]['overall']:.3f}", file=sys.stderr, flush=True)
    if args.steps_baseline:
        for seed in args.seeds:
            for budget in sorted(args.budgets):
                counted = search(model, prompts, lambda p, i: torch.zeros(len(p)), "random", 1, steps * budget, args.guidance, seed)
                scores = evaluate(prompts, counted.images)
                points.append({"run": str(run_dir), "seed": seed, "method": "more steps", "verifier": "–", "budget": budget,
                               "nfe": counted.nfe(), "steps": steps * budget, **{key: scores[key] for key in SCORES}})
    return points


def _measure_with_threads(run_dir: Path, args, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    return measure_run(run_dir, args)


def measure_runs(args) -> list[list[dict]]:
    """Each run's points, in order. With --jobs N the runs are measured N at a time in spawned processes, the
    threads split between them: a sampler this small uses one core better than two (on the 2-core Xeon a
    study variant pinned to one core trains at 190 images/s, two threads at about 215)."""
    jobs = min(args.jobs, len(args.runs))
    if jobs == 1:
        return [measure_run(run, args) for run in args.runs]
    import multiprocessing  # noqa: PLC0415
    from concurrent.futures import ProcessPoolExecutor  # noqa: PLC0415

    threads = max(1, (args.threads or torch.get_num_threads()) // jobs)
    print(f"[search] {len(args.runs)} runs, {jobs} at a time, {threads} thread(s) each", file=sys.stderr, flush=True)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_measure_with_threads, args.runs, [args] * len(args.runs), [threads] * len(args.runs)))


def summarise(points: list[dict]) -> list[dict]:
    """Mean ± std over runs x seeds per (method, verifier, budget)."""
    keys = sorted({(p["method"], p["verifier"], p["budget"]) for p in points}, key=lambda k: (k[0] == "more steps", k))
    rows = []
    for method, verifier, budget in keys:
        group = [p for p in points if (p["method"], p["verifier"], p["budget"]) == (method, verifier, budget)]
        rows.append({
            "method": method, "verifier": verifier, "budget": budget, "nfe": group[0]["nfe"], "n": len(group),
            **{key: _spread([p[key] for p in group]) for key in (*SCORES, "verifier_score") if key in group[0]},
        })
    return rows


def markdown(result: dict) -> str:
    lines = [
        "# Inference-time search: evaluator score against sampling compute",
        "",
        f"Runs: {', '.join(f'`{r}`' for r in result['runs'])}; noise seeds {result['seeds']}; {result['prompts']} val prompts; "
        f"{result['steps']} Euler steps per sample, guidance {result['guidance'] if result['guidance'] is not None else 'the recipe'}; "
        f"zero-order step {result['step']}, {result['neighbours']} neighbours per round. Scores: the shapes evaluator, mean ± std over "
        "runs x seeds. NFE: generator function evaluations per prompt (classifier-free guidance counts twice). "
        "`oracle` is the evaluator itself: an upper bound, not a deployable verifier.",
        "",
        "| method | verifier | budget | NFE | overall | strict overall | verifier score | n |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(row, key):
        value = row.get(key)
        return "–" if not value else (f"{value['mean']:.3f} ± {value['std']:.3f}" if row["n"] > 1 else f"{value['mean']:.3f}")

    for row in result["rows"]:
        budget = f"{row['budget']}x steps" if row["method"] == "more steps" else str(row["budget"])
        lines.append(f"| {row['method']} | {row['verifier']} | {budget} | {row['nfe']:.0f} | {cell(row, 'overall')} | "
                     f"{cell(row, 'strict_overall')} | {cell(row, 'verifier_score')} | {row['n']} |")
    lines += ["", f"Machine: {result['machine']}; command: `{result['environment']['command']}`"]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, axis = plt.subplots(figsize=(7, 4.5))
    lines = sorted({(r["method"], r["verifier"]) for r in result["rows"]}, key=lambda k: (k[0] == "more steps", k))
    styles = {"random": ("-", "o"), "zero_order": ("--", "s"), "more steps": (":", "x")}  # line and marker per method
    colours = {"oracle": "tab:blue", "agreement": "tab:orange", "self": "tab:green"}  # colour per verifier
    for method, verifier in lines:
        rows = [r for r in result["rows"] if (r["method"], r["verifier"]) == (method, verifier)]
        label = "more Euler steps (no search)" if method == "more steps" else f"{method} + {verifier}"
        line, marker = styles.get(method, ("-", "o"))
        axis.errorbar([r["nfe"] for r in rows], [r["overall"]["mean"] for r in rows], yerr=[r["overall"]["std"] for r in rows],
                      linestyle=line, marker=marker, capsize=3, label=label, color=colours.get(verifier, "grey"))
    axis.set_xscale("log", base=2)
    axis.set_xlabel("generator function evaluations per prompt (NFE)")
    axis.set_ylabel("evaluator overall")
    axis.set_title("Search over initial noises: score vs sampling compute")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="trained run directories (with a vision encoder for the self verifier)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[1, 2, 4, 8], help="candidates per prompt (default 1 2 4 8)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--verifiers", nargs="+", default=list(VERIFIERS), choices=VERIFIERS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="noise seeds per run (default 0)")
    parser.add_argument("--prompts", type=int, default=128, help="val prompts (default 128)")
    parser.add_argument("--steps", type=int, default=20, help="Euler steps per sample (default 20, as the studies evaluate)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance (default: the run's objective.guidance)")
    parser.add_argument("--step", type=float, default=0.5, help="zero-order neighbourhood size (default 0.5)")
    parser.add_argument("--neighbours", type=int, default=2, help="zero-order candidates per round (default 2)")
    parser.add_argument("--no-steps-baseline", dest="steps_baseline", action="store_false", help="skip the more-steps rows")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs measured side by side, each in its own process with its share of --threads (default 1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results root (default benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="4 prompts, budgets 1 2, 2 steps: checks the harness, not the numbers")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.prompts, args.budgets, args.steps = 4, [1, 2], 2
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    points = [p for run_points in measure_runs(args) for p in run_points]
    device = torch.device("cpu")
    result = {
        "quick": args.quick, "machine": machine_slug(device), "runs": [str(r) for r in args.runs], "seeds": args.seeds,
        "prompts": args.prompts, "steps": next(p["steps"] for p in points if p["method"] != "more steps"), "guidance": args.guidance,
        "step": args.step, "neighbours": args.neighbours, "points": points, "rows": summarise(points),
        "environment": environment(device, "python -m benchmarks.search " + " ".join(argv if argv is not None else sys.argv[1:])),
    }
    folder = args.out / result["machine"]
    folder.mkdir(parents=True, exist_ok=True)
    name = "search-quick" if args.quick else "search"
    (folder / f"{name}.json").write_text(json.dumps(result, indent=2))
    (folder / f"{name}.md").write_text(markdown(result))
    plot(result, folder / f"{name}.png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
