"""`python -m benchmarks.vae_pretraining [--schedules STEPSxBATCH:PRECISION ...] [--seeds S ...] [--images N] [--quick]`:
what a pretraining schedule of the tiny VAE costs and what it keeps.

Each schedule trains the default recipe's VAE (`recipes/vae/tiny.yaml`'s architecture,
learning rate and KL weight) the way `unizoo train` does on an empty cache: the same
initialisation (seed 0), the same loader of the default data (its batches split into steps of
BATCH images) and so the same data order, through `train_autoencoder`. Reported per schedule:
the wall time, the reconstruction loss of the last step, and the evaluator's score of the round
trip decode(encode(x)) of the first `--images` val images, overall and for counting (the small
objects are the last a VAE learns to keep). One process, one schedule after the other: run it
on a quiet machine.

`--seeds 0 1 2` trains each schedule once per seed, from the initialisation and posterior noise
of that seed (the data order stays the recipe's): how much of a round trip is the schedule's and
how much the luck of one initialisation. Seed 0 is the one `unizoo train` uses.

Writes `<out>/<machine>/vae_pretraining.{json,md}` (`-quick` for --quick).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from hydra.utils import instantiate

from unizoo.config.composition import compose_recipe
from unizoo.eval.evaluation import first_items
from unizoo.eval.geneval import evaluate
from unizoo.pretraining.autoencoder import train_autoencoder

from .report import MARKDOWN, environment, write_results

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DEFAULT_SCHEDULES = ("1000x64:32-true", "1000x32:32-true", "850x32:32-true", "1000x32:bf16-mixed")
SHIPPED_SEED = 0  # the cache's seed (unizoo.pretraining.cache): the initialisation `unizoo train` pretrains from
# --quick: a 16-channel VAE, a few steps of 4 images: checks the harness, the numbers mean nothing.
QUICK_OVERRIDES = ("data.batch_size=8", "vae.autoencoder.block_out_channels=[16,16,16]")


def parse_schedule(text: str) -> tuple[int, int, str]:
    """"850x32:32-true" -> (850 steps, 32 images per step, "32-true")."""
    try:
        size, precision = text.split(":")
        steps, batch = (int(part) for part in size.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected STEPSxBATCH:PRECISION, e.g. 850x32:32-true") from None
    if precision not in ("32-true", "bf16-mixed"):
        raise argparse.ArgumentTypeError(f"{text!r}: precision must be 32-true or bf16-mixed")
    return steps, batch, precision


def measure_schedule(recipe, datamodule, schedule: tuple[int, int, str], images: torch.Tensor, captions: list[str],
                     seed: int = SHIPPED_SEED) -> dict:
    """One row: train a fresh VAE on `schedule` as `unizoo train` would (from `seed`'s initialisation), then score its
    round trip."""
    steps, batch, precision = schedule
    representation = instantiate(recipe.representation)  # its VAE config: the recipe's architecture
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL.from_config(representation.vae.config)
        start = time.perf_counter()
        with torch.enable_grad():
            losses = train_autoencoder(vae, datamodule.train_dataloader(), steps, lr=recipe.vae.pretraining.lr,
                                       kl_weight=recipe.vae.pretraining.kl_weight, batch_size=batch,
                                       precision=precision, seed=seed)
        seconds = time.perf_counter() - start
    vae.eval()
    with torch.no_grad():
        decoded = vae.decode(vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)
    original, round_trip = evaluate(captions, images), evaluate(captions, decoded)
    return {"steps": steps, "batch": batch, "precision": precision, "seed": seed, "seconds": round(seconds, 1),
            "final_loss": round(losses["reconstruction"], 4),
            "round_trip_overall": round(round_trip["overall"] / original["overall"], 3),
            "round_trip_counting": round(round_trip.get("counting", float("nan")), 3)}


def vae_pretraining_markdown(result: dict, peaks: dict) -> str:
    lines = [f"### Pretraining the tiny VAE: cost and round trip ({result['images']} val images, the recipe's data order)", "",
             f"Seed {SHIPPED_SEED} is the initialisation `unizoo train` pretrains from.", "",
             "| steps x images | precision | seed | wall (s) | last step's loss | round trip, overall | round trip, counting |",
             "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['steps']} x {row['batch']} | {row['precision']} | {row.get('seed', SHIPPED_SEED)} | {row['seconds']:.0f} "
                     f"| {row['final_loss']:.4f} | {row['round_trip_overall']:.3f} | {row['round_trip_counting']:.3f} |")
    return "\n".join(lines)


MARKDOWN.setdefault("vae_pretraining", vae_pretraining_markdown)  # report.write_results finds it here


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedules", nargs="+", type=parse_schedule, default=None,
                        help=f"STEPSxBATCH:PRECISION each (default {' '.join(DEFAULT_SCHEDULES)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[SHIPPED_SEED],
                        help=f"train each schedule once per seed (initialisation and posterior noise; default {SHIPPED_SEED}, "
                             "the one unizoo train uses)")
    parser.add_argument("--images", type=int, default=256, help="val images of the round trip (default 256)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and steps: a smoke test of the harness")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results root (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    schedules = args.schedules or [parse_schedule(s) for s in (("3x4:32-true", "3x4:bf16-mixed") if args.quick else DEFAULT_SCHEDULES)]
    recipe = compose_recipe("default", list(QUICK_OVERRIDES) if args.quick else [])
    datamodule = instantiate(recipe.data)
    datamodule.setup("fit")
    datamodule.setup("validate")
    images, captions = first_items(datamodule.val_dataloader(), 8 if args.quick else args.images)
    rows = []
    for schedule in schedules:
        for seed in args.seeds:
            rows.append(measure_schedule(recipe, datamodule, schedule, images, list(captions), seed))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    env = environment(torch.device("cpu"), " ".join(["python -m benchmarks.vae_pretraining", *(sys.argv[1:] if argv is None else argv)]))
    *_, table = write_results("vae_pretraining", {"images": len(captions), "rows": rows}, env, {}, args.out, args.quick)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
