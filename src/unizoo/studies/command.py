"""`unizoo study [STUDY] [--select AXIS=A,B] [--seeds N] [--jobs N] [--out DIR] [--launcher local|slurm ...]`."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

DEFAULT_STUDY = "design_space"
DEFAULT_ROOT = Path("runs") / "studies"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", nargs="?", default=DEFAULT_STUDY,
                        help=f"a study under recipes/studies/ (smoke, design_space) or a study file's path (default {DEFAULT_STUDY})")
    parser.add_argument("--select", nargs="+", default=[], metavar="AXIS=CHOICE[,CHOICE]",
                        help="keep only these choices of an axis, e.g. objective=flow_matching strategy=joint,sequential")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per cell (default: the study's `seeds`)")
    parser.add_argument("--jobs", type=int, default=None, help="variants in flight at once (default 1 locally, all on SLURM)")
    parser.add_argument("--out", type=Path, default=None, help=f"the study folder (default {DEFAULT_ROOT}/<study>)")
    parser.add_argument("--override", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="recipe overrides every variant gets after the study's own, e.g. strategy.generation_steps=50")
    parser.add_argument("--report", action="store_true", help="only rewrite the report from the variants already run")
    group = parser.add_argument_group("launcher (defaults: the study file's `launcher:` block)")
    group.add_argument("--launcher", choices=("local", "slurm"), default=None, help="where variants run (default local)")
    group.add_argument("--partition", default=None, help="SLURM partition")
    group.add_argument("--gpus-per-variant", type=int, default=None, help="GPUs per variant (default 0: CPU)")
    group.add_argument("--per-device", type=int, default=None, metavar="N",
                       help="N variants at once on each GPU of the machine (local), or per GPU job (slurm); "
                            "default on a GPU machine: as many as one variant's measured memory allows")
    group.add_argument("--parallel", type=int, default=None, metavar="N",
                       help="N variants at once on a CPU machine, each pinned to its share of the cores (local)")
    group.add_argument("--time-min", type=int, default=None, help="time limit of a variant in minutes (default 1440)")
    group.add_argument("--cpus-per-task", type=int, default=None, help="SLURM CPUs per task")
    group.add_argument("--mem-gb", type=float, default=None, help="SLURM memory per variant (GB)")
    group.add_argument("--account", default=None, help="SLURM account")
    group.add_argument("--qos", default=None, help="SLURM quality of service")
    group.add_argument("--setup", nargs="+", default=None, metavar="LINE",
                       help='shell lines run before each job, e.g. "source .venv/bin/activate"')


def command_line(args: argparse.Namespace) -> str:
    """The command as it means to run: every option spelled out, so it can be pasted again."""
    parts = ["unizoo", "study", args.study]
    if args.select:
        parts += ["--select", *args.select]
    if args.override:
        parts += ["--override", *args.override]
    for option in ("seeds", "jobs", "out", "launcher", "partition", "gpus_per_variant", "per_device", "parallel", "time_min",
                   "cpus_per_task", "mem_gb", "account", "qos"):
        value = getattr(args, option)
        if value is not None:
            parts += [f"--{option.replace('_', '-')}", str(value)]
    if args.setup:
        parts += ["--setup", *args.setup]
    return shlex.join(parts)


def command_study(args: argparse.Namespace) -> int:
    from unizoo.errors import UsageError  # noqa: PLC0415
    from unizoo.studies.launcher import LauncherError, LauncherSettings  # noqa: PLC0415
    from unizoo.studies.runner import StudyBusy, run_study  # noqa: PLC0415
    from unizoo.studies.study import StudyError, load_study  # noqa: PLC0415

    try:
        study = load_study(args.study)
        if args.override:
            study = dataclasses.replace(study, common=(*study.common, *args.override))
        select = study.parse_select(args.select)
        if args.seeds is not None and args.seeds < 1:
            raise StudyError(f"--seeds must be at least 1, got {args.seeds}")
        variants = study.variants(select, args.seeds)
        launcher = LauncherSettings.from_values(study.launcher, {
            "kind": args.launcher, "jobs": args.jobs, "partition": args.partition, "gpus_per_variant": args.gpus_per_variant,
            "per_device": args.per_device, "parallel": args.parallel,
            "time_min": args.time_min, "cpus_per_task": args.cpus_per_task, "mem_gb": args.mem_gb,
            "account": args.account, "qos": args.qos, "setup": args.setup,
        })
    except (StudyError, LauncherError) as error:
        raise UsageError(str(error)) from None
    out = args.out or DEFAULT_ROOT / study.name
    if args.report:  # no lock: it only reads the variants, so it also works while the study runs
        from unizoo.studies.report import write_report  # noqa: PLC0415

        if not out.is_dir():
            raise UsageError(f"--report: {out} is no study folder (give the --out of the study)")
        for path in write_report(out, study, variants).values():
            print(path)
        return 0
    try:
        outcome = run_study(study, variants, out, launcher, command_line(args))
    except (StudyBusy, LauncherError) as error:
        raise UsageError(str(error)) from None
    except KeyboardInterrupt:
        print(f"interrupted: run the same command again to resume ({out})", file=sys.stderr)
        return 130
    for path in outcome.report.values():
        print(path)
    if outcome.failed:
        print(f"{len(outcome.failed)} of {len(variants)} variants failed: see {out / 'results.md'}")
        return 1
    return 0
