"""`unizoo train | recipe | sample`: the command line.

    unizoo train [recipe=NAME] [group=choice ...] [key=value ...]
    unizoo train resume=RUN_DIR [trainer.key=value ...]
    unizoo cache-targets targets=DIR [overrides ...]   (then: unizoo train targets=DIR [the same overrides])
    unizoo recipe [NAME] [overrides ...]
    unizoo sample RUN_DIR --prompt "two red circles" [--n 8 --steps 30 --guidance 3]
                  [--search random|zero_order --budget 8 --verifier oracle|agreement|self]
    unizoo caption RUN_DIR IMAGE [IMAGE ...]
    unizoo shards FOLDER OUT [--samples-per-shard N]
    unizoo study [STUDY] [--select AXIS=A,B] [--seeds N] [--jobs N] [--out DIR] [--launcher local|slurm]
    unizoo bench [attention|peer|loop|all] [--quick] [...]   (from a source checkout)
    unizoo env                                  (versions, devices and what unizoo chooses here: for bug reports)
    unizoo --version

Mistakes in a recipe, a path or an argument exit with status 2 and one paragraph
saying what was wrong and what would be valid; never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.errors import InstantiationException

from unizoo import __version__
from unizoo.config.composition import compose_recipe, split_recipe_override
from unizoo.data.errors import DataError
from unizoo.errors import RecipeError, UsageError
from unizoo.runtime.library_chatter import quiet_library_chatter
from unizoo.studies.command import add_arguments as add_study_arguments
from unizoo.studies.command import command_study

log = logging.getLogger("unizoo")

USAGE_ERROR = 2
TRAINING_FAILED = 1


def _setup_logging() -> None:
    # Only unizoo's own logger: Lightning and transformers keep their own handlers,
    # and a root handler would print their lines twice.
    # One console handler, on the current stderr, however often main() runs in a process (tests, studies).
    for old in [h for h in log.handlers if getattr(h, "unizoo_console", False)]:
        log.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.unizoo_console = True
    handler.setFormatter(logging.Formatter("[unizoo] %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    # A run's log keeps Lightning's own information (devices, precision) and loses its advertisements.
    quiet_library_chatter()


def _compose(arguments: Sequence[str]):
    name, overrides = split_recipe_override(arguments)
    return compose_recipe(name, overrides)


def command_recipe(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    arguments = list(args.overrides)
    if args.name:
        arguments.insert(0, args.name if args.name.startswith("recipe=") or "=" in args.name else f"recipe={args.name}")
    print(OmegaConf.to_yaml(_compose(arguments)), end="")
    return 0


def split_resume(arguments: list[str]) -> tuple[Path | None, list[str]]:
    """Pull `resume=RUN_DIR` out of `unizoo train`'s arguments: (RUN_DIR or None, the rest)."""
    found = [argument for argument in arguments if argument.startswith("resume=")]
    rest = [argument for argument in arguments if not argument.startswith("resume=")]
    if len(found) > 1:
        raise RecipeError(f"resume= is given {len(found)} times ({', '.join(found)}); give one run directory")
    return (Path(found[0].partition("=")[2]).expanduser() if found else None), rest


def command_train(args: argparse.Namespace) -> int:
    from unizoo.runtime.accelerator import check_trainer_settings

    resume, overrides = split_resume(args.overrides)
    if resume is None:
        recipe = _compose(overrides)
    else:
        from unizoo.training.resume import resume_recipe  # imports the training stack

        recipe = resume_recipe(resume, overrides)
    # Composed and the device checked before the training stack is imported (Lightning, diffusers and
    # transformers: ~8 s on 2 cores), so a wrong key, choice or device exits in ~3 s. train() checks
    # the device again for its other callers.
    check_trainer_settings(recipe.trainer.accelerator, recipe.trainer.devices)

    from torch.multiprocessing import ProcessRaisedException

    from unizoo.training.nonfinite import NonFiniteLoss, raised_in_a_worker
    from unizoo.training.train import train

    try:
        run_dir = train(recipe, run_dir=resume, resume=resume is not None)
    except (NonFiniteLoss, ProcessRaisedException) as error:
        stopped = error if isinstance(error, NonFiniteLoss) else raised_in_a_worker(error)
        if stopped is None:
            raise
        print(f"unizoo train: {stopped}", file=sys.stderr)
        return TRAINING_FAILED
    print(run_dir)
    return 0


def command_cache_targets(args: argparse.Namespace) -> int:
    from unizoo.training.cache_targets import cache_targets

    print(cache_targets(_compose(args.overrides), args.items_per_shard, args.batch_size, args.device))
    return 0


def command_sample(args: argparse.Namespace) -> int:
    from unizoo.images import save_grid, save_images
    from unizoo.text.unknown_words import warn_unknown_words
    from unizoo.training.runs import load_run, run_vocabulary

    if args.n < 1 or (args.steps is not None and args.steps < 1):
        raise UsageError(f"--n and --steps must be at least 1 (got --n {args.n}, --steps {args.steps})")
    searching = {"--budget": args.budget, "--verifier": args.verifier, "--search-step": args.search_step, "--neighbours": args.neighbours}
    if args.search is None and any(value is not None for value in searching.values()):
        given = ", ".join(name for name, value in searching.items() if value is not None)
        raise UsageError(f"{given} set how a search runs: add --search random or --search zero_order")
    recipe, model = load_run(args.run_dir, args.checkpoint)
    warn_unknown_words(model.backbone.tokenizer, [args.prompt], run_vocabulary(args.run_dir))
    prompts = [args.prompt] * args.n
    if args.search is None:
        images = model.generate(prompts, steps=args.steps, guidance=args.guidance, seed=args.seed)
    else:
        images = _searched(args, recipe, model, prompts)
    slug = re.sub(r"[^a-z0-9]+", "_", args.prompt.lower()).strip("_")[:60] or "prompt"
    out = Path(args.out) if args.out else Path(args.run_dir) / "samples" / slug
    paths = save_images(images, out)
    save_grid(images, out / "grid.png", captions=prompts, columns=min(args.n, 8))
    for path in paths:
        print(path)
    log.info("wrote %d images and grid.png to %s", len(paths), out)
    return 0


def _searched(args: argparse.Namespace, recipe, model, prompts: list[str]):
    """`unizoo sample --search`: the best of `--budget` samples per image by the verifier (unizoo.eval.search)."""
    from hydra.utils import instantiate

    from unizoo.eval.search import check_search, search
    from unizoo.eval.verifiers import build_verifier

    budget, verifier = args.budget or 8, args.verifier or "oracle"
    step, neighbours = args.search_step or 0.5, args.neighbours or 2
    check_search(args.search, budget, step, neighbours)
    datamodule = instantiate(recipe.data, _convert_="all")  # the verifiers read the run's data (its tiny CLIP, its evaluator)
    datamodule.setup("fit")
    result = search(model, prompts, build_verifier(verifier, model, recipe, datamodule), args.search, budget,
                    args.steps, args.guidance, args.seed, step, neighbours)
    plain = result.candidate_scores[0]
    log.info(
        "search %s, budget %d, verifier %s: %.0f generator evaluations per image (plain sampling: %.0f); verifier score "
        "%.3f (plain sampling's noise: %.3f); chosen candidates %s",
        args.search, budget, verifier, result.nfe(), result.nfe(1), result.scores.mean(), plain.mean(), result.chosen.tolist(),
    )
    return result.images


def command_caption(args: argparse.Namespace) -> int:
    from unizoo.images import load_images
    from unizoo.training.runs import load_run

    recipe, model = load_run(args.run_dir, args.checkpoint)
    if not model.backbone.understands_images:
        raise UsageError(f"{args.run_dir} was trained without a vision encoder (backbone.vision_encoder is null): it cannot caption")
    images, paths, skipped = load_images(args.images, recipe.data.image_size)
    for path, reason in skipped:
        log.warning("skipped %s: %s", path, reason)
    if not paths:
        raise UsageError(f"none of the {len(args.images)} images could be read")
    for path, caption in zip(paths, model.backbone.caption(images)):
        print(f"{path}\t{caption}")
    if skipped:
        log.info("captioned %d images, skipped %d unreadable", len(paths), len(skipped))
    return 0


def command_shards(args: argparse.Namespace) -> int:
    from unizoo.data.shard_writer import write_shards

    if args.samples_per_shard < 1 or not 0 <= args.val_fraction < 1:
        raise UsageError(f"--samples-per-shard must be at least 1 and --val-fraction in [0, 1) (got {args.samples_per_shard}, {args.val_fraction})")
    patterns = write_shards(args.folder, args.out, args.samples_per_shard, args.val_fraction, args.seed)
    print(f"data=webdataset 'data.urls={patterns.get('train')}' 'data.val_urls={patterns.get('val')}'")
    return 0


def command_bench(args: argparse.Namespace) -> int:
    # The harness lives in the repository's benchmarks/ (not in the wheel): find the
    # checkout this package was installed from.
    checkout = Path(__file__).resolve().parents[2]
    if not (checkout / "benchmarks" / "run.py").is_file():
        raise UsageError(
            "unizoo bench needs the benchmarks/ folder of a source checkout: clone the repository, "
            "`pip install -e .` there, and run `unizoo bench` (or `python -m benchmarks.run`) from it"
        )
    sys.path.insert(0, str(checkout))
    from benchmarks.run import main as bench_main

    return bench_main(args.arguments)


def command_env(args: argparse.Namespace) -> int:
    from unizoo.environment import describe_environment

    print(describe_environment())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unizoo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"unizoo {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a recipe end to end and write a run directory")
    train.add_argument("overrides", nargs="*", help="recipe=NAME, group=choice and key=value overrides; or resume=RUN_DIR")
    train.set_defaults(run=command_train)

    cache = commands.add_parser("cache-targets", help="encode the training set once through the frozen representation, for train targets=DIR")
    cache.add_argument("overrides", nargs="*", help="targets=DIR (where to write) and the run's recipe=NAME, group=choice, key=value overrides")
    cache.add_argument("--items-per-shard", type=int, default=4096, help="targets per safetensors shard (default 4096)")
    cache.add_argument("--batch-size", type=int, default=None, help="images per encoder call (default: data.batch_size)")
    cache.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    cache.set_defaults(run=command_cache_targets)

    recipe = commands.add_parser("recipe", help="print a composed recipe")
    recipe.add_argument("name", nargs="?", default=None, help="a named recipe (default: default)")
    recipe.add_argument("overrides", nargs="*", help="group=choice and key=value overrides")
    recipe.set_defaults(run=command_recipe)

    sample = commands.add_parser("sample", help="generate images from a trained run")
    sample.add_argument("run_dir", type=Path, help="a run directory written by `unizoo train`")
    sample.add_argument("--prompt", required=True, help='a caption, e.g. "a red circle above a blue square"')
    sample.add_argument("--n", type=int, default=8, help="images to draw (default 8)")
    sample.add_argument("--steps", type=int, default=None, help="sampler steps (default: the recipe's objective.sample_steps)")
    sample.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the recipe's objective.guidance)")
    sample.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    sample.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint other than the last stage's")
    sample.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/samples/<prompt>)")
    sample.add_argument("--search", choices=["random", "zero_order"], default=None,
                        help="search over initial noises with a verifier (Ma et al.): random (best of --budget) or zero_order (hill climb)")
    sample.add_argument("--budget", type=int, default=None, help="with --search: samples drawn per image (default 8; 1 = plain sampling)")
    sample.add_argument("--verifier", choices=["oracle", "agreement", "self"], default=None,
                        help="with --search: oracle (the shapes evaluator), agreement (tiny CLIP), self (the model captions its sample; default oracle)")
    sample.add_argument("--search-step", type=float, default=None, help="with --search zero_order: neighbourhood size in (0, 1] (default 0.5)")
    sample.add_argument("--neighbours", type=int, default=None, help="with --search zero_order: candidates per round (default 2)")
    sample.set_defaults(run=command_sample)

    caption = commands.add_parser("caption", help="caption images with a trained run's backbone")
    caption.add_argument("run_dir", type=Path, help="a run directory written by `unizoo train` (with a vision encoder)")
    caption.add_argument("images", nargs="+", type=Path, help="image files (any size; resized to the run's image size)")
    caption.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint other than the last stage's")
    caption.set_defaults(run=command_caption)

    shards = commands.add_parser("shards", help="write an image folder (data=folder's layout) as WebDataset .tar shards")
    shards.add_argument("folder", type=Path, help="a folder with metadata.jsonl (file_name, text per line)")
    shards.add_argument("out", type=Path, help="where OUT/train-NNNNNN.tar and OUT/val-NNNNNN.tar go")
    shards.add_argument("--samples-per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    shards.add_argument("--val-fraction", type=float, default=0.1, help="share held out as val shards, as data.val_fraction (default 0.1)")
    shards.add_argument("--seed", type=int, default=0, help="the split's seed, as data.seed (default 0)")
    shards.set_defaults(run=command_shards)

    study = commands.add_parser("study", help="train a grid of recipes (recipes/studies/), one job per variant, and compare them")
    add_study_arguments(study)
    study.set_defaults(run=command_study)

    env = commands.add_parser("env", help="versions, devices and what auto chooses here (attention kernel, trainer): paste it into a bug report")
    env.set_defaults(run=command_env)

    bench = commands.add_parser("bench", help="throughput benchmarks (python -m benchmarks.run --help lists the options)")
    bench.add_argument("arguments", nargs=argparse.REMAINDER, help="[attention|peer|all] [--quick] [--out DIR] ...")
    bench.set_defaults(run=command_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        return args.run(args)
    except (RecipeError, UsageError, FileNotFoundError, DataError) as error:
        print(f"unizoo {args.command}: {error}", file=sys.stderr)
        return USAGE_ERROR
    except InstantiationException as error:
        # A recipe value the component rejects (e.g. generator.size=XXL): the
        # component's own message says what is valid.
        cause = error.__cause__ or error
        if isinstance(cause, DataError):  # the data, not the recipe: its message names the path and the layout
            print(f"unizoo {args.command}: {cause}", file=sys.stderr)
            return USAGE_ERROR
        print(f"unizoo {args.command}: the recipe does not build: {cause}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
