"""`python -m benchmarks.clip_fidelity [--seeds 0 1] [--runs DIR] [--quick]`: what each lever of
CLIP-feature generation does, against the VAE default at the same generator size.

Every lever is a recipe value (RAE, Zheng et al., arXiv 2510.11690):

* `objective.shift=auto`: the timestep shift sqrt(tokens x channels / 256), 4 for 64 CLIP
  tokens of 64 channels, 1 for the default VAE target;
* `representation.normalize=channel`: per-channel rather than one scalar feature normalisation;
* `decoder.training.noise_std`: the CLIP-to-pixel decoder trained on noise-augmented features;
* `objective.prediction=x0` (JiT, Li & He, arXiv 2511.13720): the generator outputs the clean
  tokens rather than the velocity; loss and sampler stay on the velocity.

Each variant trains once per seed through `unizoo train`, in a process of its own. The lever
rows train the generation-only recipe (`strategy=generation`) at its default steps, so they
share the generator's size (one row says otherwise) and the number of optimiser steps; the
`_4k` rows train 4000 steps, and the `blip3o` rows BLIP3-o's sequential recipe, whose
generator trains on the frozen LM after 1000 understanding steps. A run whose metrics.json is
complete is reused, so an interrupted table resumes. Scores are the evaluator's on
`--prompts` val prompts (the same prompts and sampling noise for every variant). The decoder
robustness rows decode real val features plus Gaussian noise of std sigma (features are unit
scale), with and without noise augmentation. The sampler rows reload the trained runs of
`--sweep-variants` (EMA weights) and score them again at each `--guidance` scale, beside how
their generated tokens differ from the real val tokens (`feature_statistics`). The same runs
give two rows that locate where generation fails: how much the prompt lowers the loss
(`condition_use`: velocity error with the true caption, another image's caption, and none) and
from how much noise the generator still finds its way back (`recovery`: real val tokens
noised to sigma, integrated back to sigma 0 with the true caption, decoded and scored).

Writes `<out>/<machine>/clip_fidelity.{json,md}` (`-quick` for --quick).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from unizoo.components.conditioning.condition import select_rows

from .report import commit_label, environment, machine_slug

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
CLIP = "representation=clip"
# name -> (what it changes, overrides). Every CLIP variant spells out all three levers, so a
# change of the recipe defaults never changes what a row means.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "vae": ("the default recipe: VAE latents", []),
    "clip_old": ("CLIP, none of the levers (shift 1, scalar normalisation, clean decoder)",
                 [CLIP, "objective.shift=1.0", "representation.normalize=scalar", "decoder.training.noise_std=0.0"]),
    "clip_shift": ("+ shift auto (= 4) alone",
                   [CLIP, "objective.shift=auto", "representation.normalize=scalar", "decoder.training.noise_std=0.0"]),
    "clip_channel": ("+ per-channel normalisation alone",
                     [CLIP, "objective.shift=1.0", "representation.normalize=channel", "decoder.training.noise_std=0.0"]),
    "clip_noise": ("+ noise-augmented decoder (noise_std 0.5) alone",
                   [CLIP, "objective.shift=1.0", "representation.normalize=scalar", "decoder.training.noise_std=0.5"]),
    "clip_all": ("all three levers",
                 [CLIP, "objective.shift=auto", "representation.normalize=channel", "decoder.training.noise_std=0.5"]),
    "clip_x0": ("all three levers + x0 prediction",
                [CLIP, "objective.shift=auto", "representation.normalize=channel", "decoder.training.noise_std=0.5",
                 "objective.prediction=x0"]),
    "clip_x0_deep": ("all three levers + x0 prediction + a generator twice as deep (8 blocks; not the VAE's size)",
                     [CLIP, "objective.shift=auto", "representation.normalize=channel", "decoder.training.noise_std=0.5",
                      "objective.prediction=x0", "+generator.depth=8"]),
    # Longer training: the same designs at 4000 optimiser steps, 2.7x the budget of the rows above.
    "vae_4k": ("the default recipe, 4000 steps", ["strategy.steps=4000"]),
    "clip_x0_deep_4k": ("clip_x0_deep, 4000 steps",
                        [CLIP, "objective.shift=auto", "representation.normalize=channel", "decoder.training.noise_std=0.5",
                         "objective.prediction=x0", "+generator.depth=8", "strategy.steps=4000"]),
    # Until the curve is flat (strategy.until_flat): evaluated every 500 steps, stopped once the best of the last
    # 3 evaluations beats the best before them by less than 0.01, at most 8000 steps.
    "vae_flat": ("the default recipe, trained until its curve is flat (at most 8000 steps)",
                 ["strategy.until_flat={window:3,min_gain:0.01,max_steps:8000}", "evaluation.every_n_steps=500"]),
    "clip_x0_deep_flat": ("clip_x0_deep, trained until its curve is flat (at most 8000 steps)",
                          [CLIP, "objective.shift=auto", "representation.normalize=channel", "decoder.training.noise_std=0.5",
                           "objective.prediction=x0", "+generator.depth=8",
                           "strategy.until_flat={window:3,min_gain:0.01,max_steps:8000}", "evaluation.every_n_steps=500"]),
    # BLIP3-o's sequential training: 1000 understanding steps, then the generator (clip_x0_deep's
    # design; recipes/blip3o.yaml) trains on the frozen LM for a stage 2 of the row's length.
    "blip3o_1500": ("`recipe=blip3o` (sequential): 1000 understanding steps, then clip_x0_deep's generator on the frozen LM, 1500 steps",
                    ["recipe=blip3o", "strategy.generation_steps=1500"]),
    "blip3o_4k": ("`recipe=blip3o` as shipped: the same, stage 2 of 4000 steps",
                  ["recipe=blip3o", "strategy.generation_steps=4000"]),
}
# Runs whose decoders the robustness rows probe: (normalisation, decoder noise_std) -> variant.
ROBUSTNESS_RUNS = {"scalar, clean": "clip_old", "scalar, noise 0.5": "clip_noise",
                   "channel, clean": "clip_channel", "channel, noise 0.5": "clip_all"}
ROBUSTNESS_SIGMAS = (0.0, 0.2, 0.4, 0.8)
SWEEP_VARIANTS = ("vae", "clip_all", "clip_x0", "clip_x0_deep", "blip3o_4k")
SWEEP_GUIDANCES = (1.0, 6.0)  # the recipe's own (3) is the run's score, which a rerun reproduces exactly
CONDITION_SIGMAS = (0.5, 0.9, 1.0)  # noise levels of the condition_use rows (1: pure noise, where only the prompt informs)
RECOVERY_SIGMAS = (0.6, 0.8, 0.9, 1.0)  # noise levels the recovery rows start from
# Shrinks every size so --quick checks the harness in about a minute; its numbers mean nothing.
QUICK_OVERRIDES = [
    "data.train_size=128", "data.val_size=32", "data.batch_size=8", "warmup_steps=1",
    "vae.autoencoder.block_out_channels=[16,16,16]", "vae.pretraining.steps=2", "clip.pretraining.steps=2",
    "decoder.training.steps=2", "+decoder.generator.depth=1", "+generator.depth=1", "evaluation.steps=2",
    "+backbone.config_overrides={hidden_size:32,intermediate_size:64,num_hidden_layers:1,num_attention_heads:2,num_key_value_heads:1}",
    "+trainer.enable_model_summary=false",
]
CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")


def quick_steps(overrides: list[str]) -> list[str]:
    """3 optimiser steps for every stage of the strategy `overrides` compose (generation: steps; sequential: two)."""
    from unizoo.config.composition import compose_recipe, split_recipe_override  # noqa: PLC0415

    recipe = compose_recipe(*split_recipe_override(overrides))
    return [f"strategy.{key}=3" for key in recipe.strategy if str(key).endswith("steps")]


def generation_steps(recipe) -> int:
    """Optimiser steps that train the generator: a generation-only strategy's, or sequential's stage 2."""
    strategy = recipe.strategy
    return int(strategy.generation_steps if "generation_steps" in strategy else strategy.steps)


def run_dir(runs: Path, name: str) -> Path | None:
    """The newest complete run of `name` under `runs`, or None."""
    for path in sorted((runs / name).glob("*/metrics.json"), reverse=True):
        if "seconds_total" in json.loads(path.read_text()):
            return path.parent
    return None


def train_command(runs: Path, name: str, overrides: list[str], seed: int, prompts: int, quick: bool) -> list[str]:
    """The `unizoo train` command line of one variant and seed."""
    return [sys.executable, "-m", "unizoo.cli", "train", *overrides, f"seed={seed}", f"name={name}_s{seed}",
            f"run_root={runs}", f"evaluation.prompts={prompts}", "+trainer.enable_progress_bar=false",
            *([*QUICK_OVERRIDES, *quick_steps(overrides)] if quick else [])]


def train_variant(runs: Path, name: str, overrides: list[str], seed: int, prompts: int, quick: bool) -> Path:
    """`unizoo train` of one variant and seed in its own process, unless a complete run exists."""
    run_name = f"{name}_s{seed}"
    done = run_dir(runs, run_name)
    if done is not None:
        print(f"[clip_fidelity] {run_name}: reusing {done}", file=sys.stderr, flush=True)
        return done
    print(f"[clip_fidelity] {run_name}: training ({' '.join(overrides) or 'default'})", file=sys.stderr, flush=True)
    subprocess.run(train_command(runs, name, overrides, seed, prompts, quick), check=True)
    return run_dir(runs, run_name)


def train_side_by_side(runs: Path, names: list[str], seeds: list[int], prompts: int, quick: bool, jobs: int) -> None:
    """Train every (variant, seed) that has no complete run, `jobs` at a time, the cores split between them: these
    models use one core better than two (on the 2-core Xeon a run pinned to one core trains at about 190 images/s,
    one on both at about 215)."""
    missing = [(name, seed) for name in names for seed in seeds if run_dir(runs, f"{name}_s{seed}") is None]
    if jobs < 2 or len(missing) < 2:
        return
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    threads = max(1, torch.get_num_threads() // jobs)
    print(f"[clip_fidelity] training {len(missing)} runs, {jobs} at a time, {threads} thread(s) each", file=sys.stderr, flush=True)
    # Built here, one after another: composing a recipe (--quick's step counts) is not thread-safe.
    commands = [train_command(runs, name, VARIANTS[name][1], seed, prompts, quick) for name, seed in missing]
    environment_variables = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with ThreadPoolExecutor(jobs) as pool:
        for done in [pool.submit(subprocess.run, command, check=True, env=environment_variables) for command in commands]:
            done.result()


def run_scores(path: Path) -> dict:
    from omegaconf import OmegaConf  # noqa: PLC0415

    metrics = json.loads((path / "metrics.json").read_text())
    scores = {
        "untrained": metrics["untrained"]["generation"],
        "trained": metrics["generation"]["generation"],
        "seconds": sum(metrics["seconds"].values()),  # every stage: a sequential run's understanding too
        # The steps the generator trained: the recipe's, or where a stage trained until flat stopped.
        "steps": metrics.get("training", {}).get("generation", {}).get("steps") or generation_steps(OmegaConf.load(path / "recipe.yaml")),
        "representation": metrics["representation"],
    }
    converged = metrics.get("converged", {}).get("generation")
    if converged:
        scores["converged"] = f"{converged['state']} at {converged['step']}"
    if "understanding" in metrics.get("understanding", {}):  # a sequential run: its LM's captions, after each stage
        scores["understanding"] = {stage: metrics[stage]["understanding"]["overall"] for stage in ("understanding", "generation")}
    return scores


@torch.no_grad()
def decoder_robustness(path: Path, images: int) -> dict[str, float]:
    """Evaluator overall of decode(features + sigma * noise) on real val images, per sigma."""
    from hydra.utils import instantiate

    from unizoo.eval.evaluation import first_items
    from unizoo.training.runs import load_run

    recipe, model = load_run(path)
    data = instantiate(recipe.data, _convert_="all")
    data.setup("validate")
    pictures, captions = first_items(data.val_dataloader(), images)
    features = model.representation.encode(pictures)
    evaluator = instantiate(recipe.evaluator)
    noise = torch.randn(features.shape, generator=torch.Generator().manual_seed(0))
    return {str(sigma): evaluator(captions, model.representation.decode(features + sigma * noise))["overall"]
            for sigma in ROBUSTNESS_SIGMAS}


def feature_statistics(generated: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    """How generated target tokens ``(B, N, C)`` differ from real ones ``(B', N, C)`` (both normalised).

    * ``std_ratio``: per-channel std of the generated over the real, averaged over channels
      (below 1: the generator regresses towards the mean);
    * ``mean_gap``: per-channel |mean difference| in units of the real std, averaged;
    * ``neighbour_ratio``: mean squared difference between grid-neighbour tokens, generated
      over real (below 1: spatially smoother than real features; above 1: noisier).
    """
    flat_generated, flat_real = generated.flatten(0, 1).float(), real.flatten(0, 1).float()
    real_std = flat_real.std(0).clamp_min(1e-8)
    stats = {
        "std_ratio": float((flat_generated.std(0) / real_std).mean()),
        "mean_gap": float(((flat_generated.mean(0) - flat_real.mean(0)).abs() / real_std).mean()),
    }
    side = math.isqrt(generated.shape[1])
    if side * side == generated.shape[1] and side > 1:
        def roughness(tokens: torch.Tensor) -> torch.Tensor:
            grid = tokens.float().unflatten(1, (side, side))
            return ((grid[:, 1:] - grid[:, :-1]).pow(2).mean() + (grid[:, :, 1:] - grid[:, :, :-1]).pow(2).mean()) / 2
        stats["neighbour_ratio"] = float(roughness(generated) / roughness(real).clamp_min(1e-12))
    return stats


@torch.no_grad()
def condition_use(model, targets: torch.Tensor, captions: list[str]) -> dict[str, dict[str, float]]:
    """Velocity MSE per noise level with each image's own caption, another image's and the null condition.

    A generator that learned the prompt has `true` well below `shuffled` and `null`; at sigma 1
    (pure noise) `1 - true / null` is the share of the target's variance the prompt explains.
    """
    condition = model.conditioning(model.backbone, captions)
    other = select_rows(condition, torch.roll(torch.arange(len(captions)), 1))
    null = model.generator.drop_condition(condition, torch.ones(len(captions), dtype=torch.bool))
    noise = torch.randn(targets.shape, generator=torch.Generator().manual_seed(1))
    result = {}
    for sigma in CONDITION_SIGMAS:
        t = torch.full((len(captions),), sigma)
        x_t = sigma * noise + (1 - sigma) * targets
        errors = {name: float((model.objective.velocity(model.generator(x_t, t, c), x_t, t) - (noise - targets)).pow(2).mean())
                  for name, c in (("true", condition), ("shuffled", other), ("null", null))}
        result[str(sigma)] = errors
    return result


@torch.no_grad()
def recovery(model, evaluator, targets: torch.Tensor, captions: list[str], steps: int | None) -> dict[str, float]:
    """Evaluator overall of real tokens noised to sigma and integrated back by the generator (the true caption,
    the recipe's guidance and steps), per starting sigma: where between noise and data generation goes wrong."""
    condition = model.conditioning(model.backbone, captions)
    scores = {}
    for start in RECOVERY_SIGMAS:
        # The same noise (seed 1) for every start: only where the path begins differs.
        x = model.objective.sample(model.generator, condition, steps=steps, rng=torch.Generator().manual_seed(1),
                                   start=targets, start_sigma=start)
        scores[str(start)] = evaluator(captions, model.representation.decode(x))["overall"]
    return scores


@torch.no_grad()
def sampler_sweep(path: Path, prompts: int, guidances: tuple[float, ...], real_images: int) -> dict:
    """A trained run's overall score at each guidance scale (its EMA weights, its evaluation seed), and its tokens' statistics."""
    from hydra.utils import instantiate

    from unizoo.eval.evaluation import first_items
    from unizoo.training.runs import load_run

    recipe, model = load_run(path)
    data = instantiate(recipe.data, _convert_="all")
    data.setup("validate")
    texts = data.prompts("val", prompts)
    pictures, real_captions = first_items(data.val_dataloader(), real_images)
    real = model.representation.encode(pictures)
    evaluator = instantiate(recipe.evaluator)
    sweep = {"recipe_guidance": float(model.objective.guidance), "scores": {}, "features": {}}
    sweep["condition_use"] = condition_use(model, real, real_captions)
    sweep["recovery"] = recovery(model, evaluator, real, real_captions, recipe.evaluation.steps)
    print(f"[clip_fidelity] {path.parent.name}: condition use {sweep['condition_use']}, recovery {sweep['recovery']}",
          file=sys.stderr, flush=True)
    for guidance in guidances:
        images, tokens = model.generate_with_tokens(texts, steps=recipe.evaluation.steps, guidance=guidance,
                                                    seed=recipe.evaluation.seed)
        sweep["scores"][str(guidance)] = evaluator(texts, images)["overall"]
        sweep["features"][str(guidance)] = feature_statistics(tokens, real)
        print(f"[clip_fidelity] {path.parent.name} guidance {guidance}: overall {sweep['scores'][str(guidance)]:.3f}, "
              f"tokens {sweep['features'][str(guidance)]}", file=sys.stderr, flush=True)
    return sweep


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v == v]  # a score a run's evaluator did not have yet (NaN) is left out
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def merged(before: dict, now: dict) -> dict:
    """`before`'s table with `now`'s rows replacing or joining its own; each row remembers the command that made it."""
    def made_by(result: dict) -> dict:
        env = result["environment"]
        return {"command": result["command"], "commit": env["git_commit"], "git_dirty": env.get("git_dirty"),
                "variants": list(result["variants"])}

    history = before.get("made_by") or [made_by(before)]
    made_now = made_by(now)
    history = [{**entry, "variants": [v for v in entry["variants"] if v not in now["variants"]]} for entry in history]
    result = {**before, "environment": now["environment"], "command": now["command"],
              "made_by": [entry for entry in history if entry["variants"]] + [made_now],
              "seeds": sorted({*before.get("seeds", []), *now["seeds"]})}
    for key in ("variants", "robustness", "sampler"):
        result[key] = {**before.get(key, {}), **now.get(key, {})}
    return result


def markdown(result: dict) -> str:
    seeds = result["seeds"]
    made_by = result.get("made_by") or []
    lines = [
        f"<!-- {result['command']} | {result['environment']['device_name']} | torch {result['environment']['torch']} "
        f"| {commit_label(result['environment'])} -->",
        "",
        *([f"Rows {', '.join(f'`{v}`' for v in entry['variants'])}: `{entry['command']}` at "
           f"{commit_label({'git_commit': entry['commit'], 'git_dirty': entry.get('git_dirty')})}."
           for entry in made_by] + [""] if len(made_by) > 1 else []),
        f"### CLIP-feature generation: each lever alone and together, against the VAE default "
        f"(generation only unless the row says sequential, default sizes unless it says, seeds {', '.join(map(str, seeds))}, "
        f"{result['prompts']} val prompts; mean ± std over the seeds a row lists; generator steps: the optimiser steps "
        "that train the generator; understanding: a sequential run's caption score after stage 1 / after stage 2; "
        "train s: every stage)",
        "",
        "| variant | what it changes | seeds | generator steps | untrained | trained overall | gain | strict_overall | "
        + " | ".join(CATEGORIES) + " | understanding | random features | round trip | train s | converged |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(CATEGORIES) + "---|---|---|---|---|",
    ]
    for name, runs in result["variants"].items():
        trained = [r["trained"]["overall"] for r in runs]
        untrained = [r["untrained"]["overall"] for r in runs]
        cells = [_mean_std([r["trained"].get(c, float("nan")) for r in runs]) for c in CATEGORIES]
        understood = [r["understanding"] for r in runs if "understanding" in r]
        understanding = " / ".join(_mean_std([u[stage] for u in understood]) for stage in ("understanding", "generation")) if understood else "–"
        steps = sorted({r["steps"] for r in runs})
        lines.append(
            f"| `{name}` | {VARIANTS[name][0]} | {', '.join(str(r['seed']) for r in runs)} | {', '.join(map(str, steps))} | "
            f"{_mean_std(untrained)} | **{_mean_std(trained)}** | {_mean_std([t - u for t, u in zip(trained, untrained)])} | "
            f"{_mean_std([r['trained'].get('strict_overall', float('nan')) for r in runs])} | " + " | ".join(cells)
            + f" | {understanding}"
            + f" | {_mean_std([r['representation'].get('random_features', float('nan')) for r in runs])}"
            f" | {_mean_std([r['representation']['ratio'] for r in runs])}"
            f" | {statistics.mean(r['seconds'] for r in runs):.0f}"
            f" | {' / '.join(r['converged'] for r in runs if r.get('converged')) or '–'} |"
        )
    if result.get("robustness"):
        lines += [
            "",
            f"### Pixel decoder robustness: evaluator overall of decode(real features + sigma * N(0, 1)) on "
            f"{result['robustness_images']} val images (features are unit scale)",
            "",
            "| normalisation, decoder training | " + " | ".join(f"sigma {s}" for s in ROBUSTNESS_SIGMAS) + " |",
            "|---|" + "---|" * len(ROBUSTNESS_SIGMAS),
        ]
        for label, scores in result["robustness"].items():
            lines.append(f"| {label} | " + " | ".join(f"{scores[str(s)]:.3f}" for s in ROBUSTNESS_SIGMAS) + " |")
    if result.get("sampler"):
        guidances = result["guidances"]
        lines += [
            "",
            f"### Sampler: the trained runs scored again at each classifier-free guidance scale (EMA weights, "
            f"{result['prompts']} val prompts, the runs' own sampling seed), and how their generated tokens differ "
            f"from {result['robustness_images']} real val tokens (mean ± std over seeds)",
            "",
            "std ratio: per-channel std of generated over real tokens (below 1: pulled towards the mean); mean gap: "
            "per-channel mean difference in real stds; neighbour ratio: squared difference of grid-neighbour tokens, "
            "generated over real (below 1: smoother than real features).",
            "",
            "| variant | seeds | run's score (recipe guidance) | " + " | ".join(f"guidance {g:g}" for g in guidances)
            + " | " + " | ".join(f"{name} (guidance {g:g})" for g in (guidances[0], guidances[-1])
                                  for name in ("std ratio", "mean gap", "neighbour ratio")) + " |",
            "|---|---|---|" + "---|" * (len(guidances) + 6),
        ]
        for name, sweeps in result["sampler"].items():
            runs = {r["seed"]: r for r in result["variants"][name]}
            cells = [_mean_std([s["scores"][str(g)] for s in sweeps]) for g in guidances]
            stats = [_mean_std([s["features"][str(g)].get(key, float("nan")) for s in sweeps])
                     for g in (guidances[0], guidances[-1]) for key in ("std_ratio", "mean_gap", "neighbour_ratio")]
            lines.append(f"| `{name}` | {', '.join(str(s['seed']) for s in sweeps)} | "
                         f"{_mean_std([runs[s['seed']]['trained']['overall'] for s in sweeps])} "
                         f"({sweeps[0]['recipe_guidance']:g}) | " + " | ".join(cells) + " | " + " | ".join(stats) + " |")
        lines += [
            "",
            f"### Where generation fails: the same runs on {result['robustness_images']} real val images and their captions "
            "(mean ± std over seeds)",
            "",
            "condition use: velocity MSE with each image's own caption / another image's / the null condition; at sigma 1 "
            "the input is pure noise, so `1 - own / null` is the share of the target's variance the prompt explains. "
            "recovery: real tokens noised to sigma, integrated back by the generator (own caption, recipe guidance and "
            "steps), decoded and scored; sigma 1 is generation from noise for these captions.",
            "",
            "| variant | " + " | ".join(f"MSE own / other / null, sigma {s:g}" for s in CONDITION_SIGMAS)
            + " | prompt explains (sigma 1) | " + " | ".join(f"recovery from sigma {s:g}" for s in RECOVERY_SIGMAS) + " |",
            "|---|" + "---|" * (len(CONDITION_SIGMAS) + 1 + len(RECOVERY_SIGMAS)),
        ]
        for name, sweeps in result["sampler"].items():
            use = [" / ".join(_mean_std([w["condition_use"][str(s)][k] for w in sweeps]) for k in ("true", "shuffled", "null"))
                   for s in CONDITION_SIGMAS]
            explained = _mean_std([1 - w["condition_use"]["1.0"]["true"] / w["condition_use"]["1.0"]["null"] for w in sweeps])
            back = [_mean_std([w["recovery"][str(s)] for w in sweeps]) for s in RECOVERY_SIGMAS]
            lines.append(f"| `{name}` | " + " | ".join(use) + f" | {explained} | " + " | ".join(back) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.clip_fidelity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (default 0 1)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--prompts", type=int, default=256, help="val prompts scored per run (default 256)")
    parser.add_argument("--runs", type=Path, default=Path("runs/clip_fidelity"), help="where the runs go (reused)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results root (default {DEFAULT_OUT})")
    parser.add_argument("--robustness-images", type=int, default=256, help="val images of the robustness rows (0: none)")
    parser.add_argument("--sweep-variants", nargs="*", default=list(SWEEP_VARIANTS), choices=list(VARIANTS),
                        help=f"variants whose trained runs the sampler rows score again (default {' '.join(SWEEP_VARIANTS)}; none: skip)")
    parser.add_argument("--guidance", type=float, nargs="+", default=list(SWEEP_GUIDANCES),
                        help=f"guidance scales of the sampler rows (default {' '.join(map(str, SWEEP_GUIDANCES))})")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the harness, numbers mean nothing")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of the table already written for the variants not run now (their runs may be "
                             "gone): the new rows replace or join them, and the table says which command made which")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained side by side, each in its own process with its share of the cores (default 1)")
    parser.add_argument("--existing-only", action="store_true",
                        help="train nothing: tabulate the complete runs already under --runs (each row says its seeds)")
    args = parser.parse_args(argv)

    runs = args.runs.resolve()
    command = "python -m benchmarks.clip_fidelity " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": command, "environment": environment(torch.device("cpu"), command), "seeds": args.seeds, "prompts": args.prompts,
              "quick": args.quick, "variants": {}, "robustness": {}, "robustness_images": args.robustness_images,
              "guidances": args.guidance, "sampler": {}}
    if not args.existing_only:
        train_side_by_side(runs, args.variants, args.seeds, args.prompts, args.quick, args.jobs)
    for name in args.variants:
        if args.existing_only:
            found = {seed: run_dir(runs, f"{name}_s{seed}") for seed in args.seeds}
            seeds = [seed for seed, path in found.items() if path is not None]
            if seeds:
                result["variants"][name] = [dict(run_scores(found[seed]), seed=seed) for seed in seeds]
            continue
        result["variants"][name] = [
            dict(run_scores(train_variant(runs, name, VARIANTS[name][1], seed, args.prompts, args.quick)), seed=seed)
            for seed in args.seeds
        ]
    for label, name in ROBUSTNESS_RUNS.items():
        if name in result["variants"] and args.robustness_images > 0:
            probe = run_dir(runs, f"{name}_s{result['variants'][name][0]['seed']}")
            result["robustness"][label] = decoder_robustness(probe, args.robustness_images)
    for name in args.sweep_variants:
        if name in result["variants"]:
            result["sampler"][name] = [
                dict(sampler_sweep(run_dir(runs, f"{name}_s{r['seed']}"), args.prompts, tuple(args.guidance),
                                   max(args.robustness_images, 1)), seed=r["seed"])
                for r in result["variants"][name]]

    folder = args.out / machine_slug(torch.device("cpu"))
    folder.mkdir(parents=True, exist_ok=True)
    stem = "clip_fidelity-quick" if args.quick else "clip_fidelity"
    if args.merge and (folder / f"{stem}.json").is_file():
        result = merged(json.loads((folder / f"{stem}.json").read_text()), result)
    (folder / f"{stem}.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (folder / f"{stem}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
