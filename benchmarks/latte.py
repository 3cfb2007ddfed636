"""`python -m benchmarks.latte [--study DIR] [--groups 1 2 4] [--quick]`: LaTtE's layerwise timestep experts
against the plain DiT at equal parameters: sampling images/s, and the evaluator's score at equal training steps.

Speed rows: for the plain DiT and a LaTtE DiT of each `--groups` G (the same size, so the same
parameters), the default recipe's model is built and `model.generate` is timed on `--prompts`
prompts (fp32, as a run's evaluation samples; the median of `--repeats` timed calls after one
untimed call). Weights do not change the work, so the models are untrained: the speed rows need
no training. A LaTtE step runs depth / G blocks, so the generator's share of a sampling step
shrinks G-fold; the VAE decode and the backbone's condition do not.

Score rows: read from a finished `unizoo study latte` folder (`--study`, its `results.csv`):
the evaluator's overall and strict scores per cell, mean ± std over its seeds, and the
training throughput the study measured. The study trains both at the default recipe's steps.

Writes `<out>/<machine>/latte.{json,md}` (`latte-quick.*` for --quick).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from .report import environment, machine_slug

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
# Shrinks the models so --quick checks the harness in seconds; its numbers mean nothing.
QUICK_OVERRIDES = [
    "data.train_size=64", "data.val_size=32", "vae.autoencoder.block_out_channels=[16,16,16]",
    "+backbone.config_overrides={hidden_size:32,intermediate_size:64,num_hidden_layers:1,num_attention_heads:2,num_key_value_heads:1}",
    "+generator.hidden_size=32", "+generator.num_heads=2",
]


def configurations(groups: list[int]) -> list[tuple[str, int, list[str]]]:
    """(name, groups, overrides): the plain DiT, then a LaTtE DiT per G (G = 1 is the DiT as LaTtE builds it)."""
    rows = [("dit", 1, ["generator=dit"])]
    rows += [(f"latte_dit G={g}", g, ["generator=latte_dit", f"generator.groups={g}"]) for g in groups]
    return rows


def time_sampling(overrides: list[str], prompts: int, steps: int, guidance: float, repeats: int) -> dict:
    """Images/s of `model.generate` for the default recipe with `overrides`, untrained, on the CPU in fp32."""
    from unizoo.config.composition import compose_recipe  # noqa: PLC0415
    from unizoo.data.datamodule import ShapesDataModule  # noqa: PLC0415
    from unizoo.training.build import build_model  # noqa: PLC0415

    recipe = compose_recipe("default", overrides)
    torch.manual_seed(0)
    model = build_model(recipe).eval()
    captions = ShapesDataModule(val_size=prompts).prompts("val", prompts)
    model.generate(captions, steps=steps, guidance=guidance)  # untimed: allocations, kernel choices
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(captions, steps=steps, guidance=guidance)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    generator = model.generator
    blocks = len(generator.blocks) // getattr(generator, "groups", 1)
    return {
        "images_per_s": prompts / seconds,
        "seconds": seconds,
        "times": times,
        "blocks_per_step": blocks,
        "depth": len(generator.blocks),
        "generator_params": sum(p.numel() for p in generator.parameters()),
        "total_params": sum(p.numel() for p in model.parameters()),
    }


def study_scores(folder: Path) -> dict[str, dict]:
    """Per cell of a `unizoo study latte` folder: overall, strict overall and training images/s over its finished seeds."""
    from unizoo.config.composition import compose_recipe  # noqa: PLC0415
    from unizoo.studies.study import load_study  # noqa: PLC0415

    rows = list(csv.DictReader(open(folder / "results.csv")))
    study = load_study(folder / "study.yaml")
    found = {}
    for cell in study.cells():
        done = [r for r in rows if r["variant"] == cell.name and r["status"] == "done"]
        if not done:
            continue
        recipe = compose_recipe(study.recipe, list(cell.overrides))
        found[cell.name] = {
            "groups": int(recipe.generator.get("groups", 1)),
            "seeds": [int(r["seed"]) for r in done],
            **{key: _spread([float(r[key]) for r in done if r.get(key)]) for key in ("overall", "strict_overall", "images_per_s_generation")},
            "steps": int(float(done[0]["steps"])),
        }
    return found


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values} if values else {}


def _score(entry: dict, key: str, digits: int = 3) -> str:
    value = entry.get(key) or {}
    if not value:
        return "–"
    mean = f"{value['mean']:.{digits}f}"
    return f"{mean} ± {value['std']:.{digits}f}" if len(value["values"]) > 1 else mean


def markdown(result: dict) -> str:
    speed, scores = result["speed"], result["scores"]
    plain = speed[0]["images_per_s"]
    lines = [
        "# LaTtE (layerwise timestep experts) vs the plain DiT, equal parameters",
        "",
        f"Sampling: {result['prompts']} prompts, {result['steps']} Euler steps, guidance {result['guidance']}, fp32, untrained weights "
        f"(median of {result['repeats']} calls). Scores: `{result['study'] or 'no study given'}`, the evaluator on the study's val prompts, "
        "mean ± std over seeds.",
        "",
        "| generator | blocks per sampling step | generator params | sampling images/s | vs dit | overall | strict overall | seeds | training images/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in speed:
        cell = next((s for name, s in scores.items() if (name == "dit") == (row["name"] == "dit") and s["groups"] == row["groups"]), {})
        lines.append(
            f"| {row['name']} | {row['blocks_per_step']} of {row['depth']} | {row['generator_params']:,} | {row['images_per_s']:.1f} | "
            f"{row['images_per_s'] / plain:.2f}x | {_score(cell, 'overall')} | {_score(cell, 'strict_overall')} | "
            f"{len(cell.get('seeds', [])) or '–'} | {_score(cell, 'images_per_s_generation', 1)} |"
        )
    lines += ["", f"Machine: {result['machine']}; command: `{result['environment'].get('command', '')}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, default=None, help="a finished `unizoo study latte` folder (default: speed rows only)")
    parser.add_argument("--groups", type=int, nargs="+", default=[2, 4], help="LaTtE group counts to time (default 2 4)")
    parser.add_argument("--prompts", type=int, default=64, help="prompts per timed call (default 64, one batch)")
    parser.add_argument("--steps", type=int, default=20, help="Euler steps (default 20, as the study's evaluation.steps)")
    parser.add_argument("--guidance", type=float, default=3.0, help="guidance scale (default 3, the recipe's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results root (default benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the harness, not the numbers")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    extra = QUICK_OVERRIDES if args.quick else []
    if args.quick:
        args.prompts, args.steps, args.repeats = 4, 2, 1
    speed = []
    for name, groups, overrides in configurations(args.groups):
        print(f"[latte] timing {name}", file=sys.stderr, flush=True)
        speed.append({"name": name, "groups": groups, "overrides": overrides,
                      **time_sampling([*overrides, *extra], args.prompts, args.steps, args.guidance, args.repeats)})
    device = torch.device("cpu")
    result = {
        "quick": args.quick, "machine": machine_slug(device), "prompts": args.prompts, "steps": args.steps,
        "guidance": args.guidance, "repeats": args.repeats, "speed": speed,
        "study": str(args.study) if args.study else None, "scores": study_scores(args.study) if args.study else {},
        "environment": environment(device, "python -m benchmarks.latte " + " ".join(argv if argv is not None else sys.argv[1:])),
    }
    folder = args.out / result["machine"]
    folder.mkdir(parents=True, exist_ok=True)
    name = "latte-quick" if args.quick else "latte"
    (folder / f"{name}.json").write_text(json.dumps(result, indent=2))
    (folder / f"{name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
