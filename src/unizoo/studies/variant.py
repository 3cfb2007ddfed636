"""The job of one variant: compose its recipe, `train()` it in this process, record how it went.

submitit runs `run_variant` in a process of its own (locally or as a SLURM job), so a
crash ends one variant, never the study, and Lightning's DDP starts its ranks inside
the variant as it would from `unizoo train`. The variant's folder:

    variants/<name>/
        status.json    running / done / failed (+ the error's last line): what a re-run skips
        run/           the run directory train() writes (recipe.yaml, metrics.json, grids, checkpoints)
        samples.pt     the study's grid prompts drawn by the trained model (for the side-by-side figure)
        samples.png    the same, as one labelled grid
        error.txt      the traceback, when it failed
        submitit/      the job's stdout / stderr logs
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from unizoo.studies.status import DONE, FAILED, RUNNING, process_alive, write_status

log = logging.getLogger("unizoo")

VARIANTS_DIR = "variants"
RUN_DIR = "run"
SAMPLES_FILE = "samples.pt"
SAMPLES_GRID = "samples.png"
ERROR_FILE = "error.txt"
STUDY_GONE = 75  # exit status of a variant whose study process ended (EX_TEMPFAIL: try again)
WATCH_INTERVAL_S = 1.0


@dataclass(frozen=True)
class VariantJob:
    """Everything the job needs, pickled by submitit."""

    name: str
    recipe: str
    overrides: tuple[str, ...]
    folder: str
    grid_prompts: int = 8
    study_pid: int | None = None  # local launcher: end with the study process, so a killed study leaves no orphans
    cpus: tuple[int, ...] = ()  # --parallel: the cores this variant is pinned to
    threads: int | None = None  # --parallel: its torch threads (one per core it holds)


def variant_folder(out: Path, variant) -> Path:
    """``<study folder>/variants/<cell>-seed<N>/`` of a `unizoo.studies.study.Variant`."""
    return Path(out) / VARIANTS_DIR / variant.name


def error_line(error: BaseException) -> str:
    """The root cause's type and the last line of its message: what the results table shows."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[-1].strip()}" if lines else type(error).__name__
    return text[:300]


def run_variant(job: VariantJob) -> str:
    """Train the variant; returns its run directory. Raises what train() raised, after recording it."""
    folder = Path(job.folder)
    lead = _rank() == 0  # on SLURM every task of a multi-GPU job runs this; one keeps the books
    if lead:
        write_status(folder, RUNNING, pid=os.getpid(), host=socket.gethostname(), started=time.time(), error=None)
    _log_to_stderr()
    if job.study_pid:
        _end_with(job.study_pid, folder)
    _take_cores(job)
    try:
        from unizoo.config.composition import compose_recipe  # noqa: PLC0415 - heavy imports inside the job
        from unizoo.training.train import train  # noqa: PLC0415

        log.info("variant %s: %s %s", job.name, job.recipe, " ".join(job.overrides))
        run_dir = train(compose_recipe(job.recipe, job.overrides), run_dir=folder / RUN_DIR)
        if lead:
            _draw_grid(run_dir, folder, job.grid_prompts)
    except BaseException as error:
        if lead:
            (folder / ERROR_FILE).write_text(traceback.format_exc())
            write_status(folder, FAILED, error=error_line(error), finished=time.time())
        raise
    if lead:
        write_status(folder, DONE, finished=time.time())
    return str(run_dir)


def _take_cores(job: VariantJob) -> None:
    """Pin this process (and the workers it starts) to its share of the cores, with as many torch threads."""
    if job.cpus:
        os.sched_setaffinity(0, job.cpus)
    if job.threads:
        import torch  # noqa: PLC0415

        torch.set_num_threads(job.threads)
        log.info("variant %s: %d torch threads on cores %s", job.name, job.threads, ",".join(map(str, job.cpus)) or "any")


def run_variant_group(jobs: list[VariantJob]) -> list[str]:
    """Several variants side by side in one job (SLURM with --per-device: one GPU, N variants), each in a process
    of its own; returns each one's run directory or error line. A failed variant never stops the others."""
    import multiprocessing  # noqa: PLC0415
    from concurrent.futures import ProcessPoolExecutor  # noqa: PLC0415

    outcomes = []
    with ProcessPoolExecutor(max_workers=len(jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_variant, job) for job in jobs]
        for job, future in zip(jobs, futures):
            try:
                outcomes.append(future.result())
            except BaseException as error:  # noqa: BLE001 - recorded in its status.json by run_variant
                outcomes.append(f"{job.name}: {error_line(error)}")
    return outcomes


def _draw_grid(run_dir: Path, folder: Path, n: int) -> None:
    """The first ``n`` val prompts drawn by the trained model, with the evaluation's noise seed: the same for every variant."""
    import torch  # noqa: PLC0415
    from hydra.utils import instantiate  # noqa: PLC0415

    from unizoo.images import save_grid  # noqa: PLC0415
    from unizoo.training.runs import load_run  # noqa: PLC0415

    recipe, model = load_run(run_dir)
    prompts = instantiate(recipe.data).prompts("val", n)
    evaluation = recipe.evaluation
    images = model.generate(prompts, steps=evaluation.steps, guidance=evaluation.guidance, seed=evaluation.seed)
    torch.save({"prompts": prompts, "images": images}, folder / SAMPLES_FILE)
    save_grid(images, folder / SAMPLES_GRID, captions=prompts, columns=len(prompts))


def _rank() -> int:
    for name in ("SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def _log_to_stderr() -> None:
    # The job's stderr is its submitit log file: the run's lines belong there.
    if not any(getattr(h, "_unizoo_job", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[unizoo] %(asctime)s %(message)s", "%H:%M:%S"))
        handler._unizoo_job = True
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def _end_with(study_pid: int, folder: Path) -> None:
    """A daemon thread that ends this process when the study process is gone (killed, crashed).

    submitit's local jobs outlive the process that submitted them; a study that was
    killed must not leave variants training that its next run would start again.
    """

    def watch() -> None:
        while process_alive(study_pid):
            time.sleep(WATCH_INTERVAL_S)
        write_status(folder, FAILED, error=f"interrupted: the study process {study_pid} ended", finished=time.time())
        os._exit(STUDY_GONE)

    threading.Thread(target=watch, name="unizoo-study-watch", daemon=True).start()
