"""Run a study: every variant not yet done, at most N at a time, each a submitit job; then the report.

The study folder is the state: each variant's ``status.json`` says whether it is done,
so the same command run again skips what finished and runs what failed or was
interrupted. One study process at a time holds the folder (a lock the OS releases
when the process dies, however it dies).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from unizoo.config.composition import compose_recipe
from unizoo.studies.launcher import LauncherSettings
from unizoo.studies.packing import Slot, estimate_per_device
from unizoo.studies.report import COMMAND_FILE, write_report
from unizoo.studies.status import DONE, FAILED, RUNNING, SUBMITTED, process_alive, read_status, write_status
from unizoo.studies.study import Study, Variant
from unizoo.studies.variant import (
    ERROR_FILE,
    RUN_DIR,
    SAMPLES_FILE,
    SAMPLES_GRID,
    VariantJob,
    error_line,
    run_variant,
    run_variant_group,
    variant_folder,
)

log = logging.getLogger("unizoo")

RECIPES_DIR = "recipes"
JOB_FILE = "job.json"  # the launcher and job id of the variant's last submission
SUBMITIT_DIR = "submitit"
LOCK_FILE = ".lock"
ORPHAN_WAIT_S = 30  # a killed study's local variants end themselves within a second or two
ACTIVE_SLURM_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED")


class StudyBusy(RuntimeError):
    """Another study process holds the folder."""


@dataclass
class Outcome:
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    report: dict[str, Path] = field(default_factory=dict)


@contextmanager
def study_lock(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise StudyBusy(f"another `unizoo study` (pid {handle.read().strip() or '?'}) is running in {out}; "
                            "wait for it to end, or give this one another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield


@dataclass
class _Plan:
    variant: Variant
    folder: Path
    overrides: tuple[str, ...]
    steps: int | None  # optimiser steps over all stages: the ETA's weight
    error: str | None = None  # the recipe does not compose


def _plan(study: Study, variants: list[Variant], out: Path, launcher: LauncherSettings) -> list[_Plan]:
    """Compose every variant's recipe (saved to recipes/<variant>.yaml) and count its steps."""
    from hydra.utils import instantiate  # noqa: PLC0415

    plans = []
    (out / RECIPES_DIR).mkdir(parents=True, exist_ok=True)
    for variant in variants:
        overrides = (*variant.overrides, *launcher.recipe_overrides())
        plan = _Plan(variant, variant_folder(out, variant), overrides, None)
        try:
            recipe = compose_recipe(study.recipe, overrides)
            OmegaConf.save(recipe, out / RECIPES_DIR / f"{variant.name}.yaml", resolve=True)
            plan.steps = sum(stage.steps for stage in instantiate(recipe.strategy).stages)
        except Exception as error:  # noqa: BLE001 - reported as the variant's failure; the others run
            plan.error = error_line(error)
        plans.append(plan)
    return plans


def _reset(folder: Path) -> None:
    """What an earlier, unfinished attempt left: removed, so the new run starts clean."""
    shutil.rmtree(folder / RUN_DIR, ignore_errors=True)
    for name in (ERROR_FILE, SAMPLES_FILE, SAMPLES_GRID):
        (folder / name).unlink(missing_ok=True)


def _job_record(folder: Path) -> dict:
    try:
        return json.loads((folder / JOB_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _wait_for_orphan(name: str, folder: Path, progress) -> None:
    """A local variant of a killed study ends itself (its watch thread); wait until it has."""
    status, record = read_status(folder), _job_record(folder)
    pid = status.get("pid")
    if record.get("launcher") != "local" or status.get("host") != socket.gethostname() or not process_alive(pid):
        return
    progress(f"{name}: its process {pid} from an earlier study run is still alive; waiting for it to end")
    deadline = time.monotonic() + ORPHAN_WAIT_S
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    if process_alive(pid):
        raise StudyBusy(f"variant {name}: process {pid} of an earlier study run is still training; end it first")


def _slurm_job_active(folder: Path):
    """The SLURM job of an earlier study run that is still queued or running, re-attached; else None."""
    import submitit  # noqa: PLC0415

    record, status = _job_record(folder), read_status(folder)
    if record.get("launcher") != "slurm" or status.get("state") not in (SUBMITTED, RUNNING):
        return None
    job = submitit.SlurmJob(folder=folder / SUBMITIT_DIR, job_id=record["job_id"])
    return job if job.state.split()[0] in ACTIVE_SLURM_STATES else None


class _Progress:
    """One line per variant event: position, name, counts and the estimated time left."""

    def __init__(self, total: int, in_flight: int, emit: Callable[[str], None]) -> None:
        self.total, self.in_flight, self.emit = total, in_flight, emit
        self.started = time.monotonic()
        self.finished_s, self.finished_steps, self.remaining_steps = 0.0, 0, 0

    def eta(self) -> str:
        if not self.finished_steps:
            return "ETA after the first variant"
        left = self.remaining_steps * self.finished_s / self.finished_steps / self.in_flight
        at = time.strftime("%H:%M", time.localtime(time.time() + left))
        return f"ETA {at} ({left / 60:.0f} min left)"

    def line(self, index: int, verb: str, name: str, detail: str = "") -> None:
        elapsed = (time.monotonic() - self.started) / 60
        self.emit(f"study [{index}/{self.total}] {verb:<7} {name}{detail} | {elapsed:.1f} min elapsed, {self.eta()}")


def run_study(
    study: Study,
    variants: list[Variant],
    out: Path,
    launcher: LauncherSettings,
    command: str,
    progress: Callable[[str], None] = log.info,
    poll_s: float = 1.0,
    grid_prompts: int = 8,
) -> Outcome:
    """Train every variant that is not done, then write the report; returns what happened."""
    out = Path(out)
    outcome = Outcome()
    launcher.require_available()
    with study_lock(out):
        with open(out / COMMAND_FILE, "a") as handle:
            handle.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n{command}\n")
        shutil.copyfile(study.path, out / "study.yaml")
        gpu_count = _local_gpus(launcher)
        launcher = _packed(launcher, study, variants, gpu_count, progress)
        plans = _plan(study, variants, out, launcher)
        in_flight_max = launcher.in_flight(len(plans), gpu_count)
        if launcher.kind == "slurm" and launcher.per_device is not None:
            in_flight_max = max(in_flight_max, launcher.per_device)  # a GPU job holds per_device variants
        slots = launcher.slots(in_flight_max, gpu_count)
        if launcher.per_device is not None or launcher.parallel is not None:
            progress(f"study: {in_flight_max} variants at once: " + "; ".join(slot.describe() for slot in slots[:in_flight_max]))
        meter = _Progress(len(plans), in_flight_max, progress)
        todo, running = [], {}
        for index, plan in enumerate(plans, 1):
            status = read_status(plan.folder)
            if status.get("state") == DONE:
                outcome.skipped.append(plan.variant.name)
                meter.line(index, "skip", plan.variant.name, ": done in an earlier run")
                continue
            if plan.error is not None:
                write_status(plan.folder, FAILED, error=plan.error, finished=time.time())
                outcome.failed[plan.variant.name] = plan.error
                meter.line(index, "FAILED", plan.variant.name, f": the recipe does not compose: {plan.error}")
                continue
            job = _slurm_job_active(plan.folder) if launcher.kind == "slurm" else None
            if job is not None:
                running[plan.variant.name] = (index, plan, job, time.monotonic(), None)
                meter.line(index, "attach", plan.variant.name, f": SLURM job {job.job_id} of an earlier run")
            else:
                _wait_for_orphan(plan.variant.name, plan.folder, progress)
                todo.append((index, plan))
            meter.remaining_steps += plan.steps or 0

        free_slots = list(slots)  # a local variant's slot: its GPUs, or its cores
        grouped = launcher.kind == "slurm" and launcher.per_device is not None
        while todo or running:
            while todo and len(running) < in_flight_max:
                # One variant per job; on SLURM with --per-device, up to per_device variants share a one-GPU job.
                batch = [todo.pop(0) for _ in range(min(len(todo), launcher.per_device if grouped else 1))]
                slot = free_slots.pop(0) if free_slots and not grouped else None
                try:
                    job = _submit(study, [plan for _, plan in batch], launcher, slot, grid_prompts)
                except Exception as error:  # noqa: BLE001 - e.g. sbatch refused it: the others still go
                    if slot is not None:
                        free_slots.append(slot)
                    for index, plan in batch:
                        outcome.failed[plan.variant.name] = write_status(plan.folder, FAILED, error=error_line(error))["error"]
                        meter.line(index, "FAILED", plan.variant.name, f": not submitted: {outcome.failed[plan.variant.name]}")
                    continue
                for index, plan in batch:
                    running[plan.variant.name] = (index, plan, job, time.monotonic(), slot)
                    where = f", {slot.describe()}" if slot is not None and (slot.gpus or slot.cpus) else ""
                    meter.line(index, "start", plan.variant.name, f" ({plan.steps} steps, job {job.job_id}{where})")
            finished = [name for name, (_, _, job, _, _) in running.items() if job.done()]
            for name in finished:
                index, plan, job, started, slot = running.pop(name)
                if slot is not None:
                    free_slots.append(slot)
                seconds = time.monotonic() - started
                meter.remaining_steps -= plan.steps or 0
                status = _settle(plan, job)
                if status["state"] == DONE:
                    meter.finished_s += seconds  # the ETA's rate: finished trainings only, not quick failures
                    meter.finished_steps += plan.steps or 0
                    outcome.done.append(name)
                    meter.line(index, "done", name, f" in {seconds / 60:.1f} min{_headline(plan.folder)}")
                else:
                    outcome.failed[name] = status.get("error") or "failed"
                    meter.line(index, "FAILED", name, f" after {seconds / 60:.1f} min: {outcome.failed[name]}")
            if finished and (todo or running):
                _interim_report(out, study, variants, progress)
            if running and not finished:
                time.sleep(poll_s)
        outcome.report = write_report(out, study, variants)
    return outcome


def _submit(study: Study, plans: list[_Plan], launcher: LauncherSettings, slot: Slot | None, grid_prompts: int):
    """One job: one variant, or (SLURM with --per-device) several sharing one GPU."""
    specs = []
    for plan in plans:
        _reset(plan.folder)
        specs.append(VariantJob(
            name=plan.variant.name, recipe=study.recipe, overrides=plan.overrides, folder=str(plan.folder),
            grid_prompts=grid_prompts, study_pid=os.getpid() if launcher.kind == "local" else None,
            cpus=slot.cpus if slot is not None else (), threads=slot.threads if slot is not None else None,
        ))
        # Written before the job exists: from then on only the job writes status.json.
        write_status(plan.folder, SUBMITTED, error=None, pid=None, host=None)
    first = plans[0]
    executor = launcher.executor(first.folder / SUBMITIT_DIR, "+".join(p.variant.name for p in plans), slot)
    job = executor.submit(run_variant, specs[0]) if len(specs) == 1 else executor.submit(run_variant_group, specs)
    for plan in plans:
        (plan.folder / JOB_FILE).write_text(json.dumps({"launcher": launcher.kind, "job_id": str(job.job_id)}))
    return job


def _local_gpus(launcher: LauncherSettings) -> int:
    """The GPUs of this machine a local study can spread variants over (0 for SLURM or a CPU machine)."""
    if launcher.kind != "local":
        return 0
    import torch  # noqa: PLC0415

    return torch.cuda.device_count()


def _packed(launcher: LauncherSettings, study: Study, variants: list[Variant], gpu_count: int, progress) -> LauncherSettings:
    """On a GPU machine with nothing said about devices, as many variants per GPU as one variant's memory allows."""
    said = launcher.per_device is not None or launcher.parallel is not None or launcher.gpus_per_variant or launcher.jobs is not None
    if launcher.kind != "local" or not gpu_count or said or not variants:
        return launcher
    recipe = compose_recipe(study.recipe, (*variants[0].overrides, "trainer.accelerator=gpu", "trainer.devices=1"))
    per_device, _ = estimate_per_device(recipe)
    progress(f"study: --per-device {per_device} on each of {gpu_count} GPU(s), from {variants[0].name}'s measured memory "
             "(--per-device N or --jobs N to choose)")
    return launcher.replace(per_device=per_device)


def _interim_report(out: Path, study: Study, variants: list[Variant], progress) -> None:
    """The report so far, after each variant: a long study can be read while it runs."""
    try:
        write_report(out, study, variants)
    except Exception as error:  # noqa: BLE001 - a report problem must not stop the training
        progress(f"the interim report failed ({error_line(error)}); it is written again at the end")


def _settle(plan: _Plan, job) -> dict:
    """The variant's final status: its own account, or the job's when it died without one."""
    status = read_status(plan.folder)
    if status.get("state") in (DONE, FAILED):
        return status
    error = job.exception()
    reason = error_line(error) if error is not None else "the job ended without recording a result"
    return write_status(plan.folder, FAILED, error=reason, finished=time.time())


def _headline(folder: Path) -> str:
    """The final headline score (and the untrained one), for the progress line."""
    try:
        metrics = json.loads((folder / RUN_DIR / "metrics.json").read_text())
        final = metrics[list(metrics["training"])[-1]]
        # Data without an exact evaluator (an image folder, shards) is summed up by its caption-image agreement.
        score = "overall" if "overall" in final["generation"] else "agreement"
        text = f": {score} {final['generation'][score]:.3f} (untrained {metrics['untrained']['generation'][score]:.3f})"
        return text + (f", FID {final['fid']:.1f}" if "fid" in final else "")
    except (OSError, KeyError, ValueError, IndexError):
        return ""
