"""One run, many processes: which process writes, and the one run directory they all share.

`unizoo train` can be started once per process by a launcher (torchrun, SLURM's srun,
or Lightning's own subprocess launcher for `DDPStrategy(start_method="popen")` and
`ModelParallelStrategy`). Every process then runs `train()`: all of them train, but only
the primary one (global rank 0) writes the recipe, the tokenizer, the evaluations and
`metrics.json`, and all of them must agree on the run directory:

* `run_dir=PATH` in the recipe (or `resume=PATH`) names it for every process;
* otherwise processes started by torchrun or SLURM use `<run_root>/<name>/<job id>`
  (`TORCHELASTIC_RUN_ID`, `SLURM_JOB_ID`), the same for all of them;
* processes Lightning starts itself inherit `UNIZOO_RUN_DIR` from the primary, which
  sets it before its first `fit`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from unizoo.errors import RecipeError
from unizoo.training.runs import RECIPE_FILE, new_run_dir

RUN_DIR_VARIABLE = "UNIZOO_RUN_DIR"


def is_primary() -> bool:
    """Whether this process is global rank 0, read from what launchers set (before any process group exists)."""
    for variable in ("RANK", "SLURM_PROCID"):  # global ranks: torchrun, srun
        if variable in os.environ:
            return int(os.environ[variable]) == 0
    # Lightning's subprocess launcher sets only the local rank and the node.
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def launched_processes() -> int:
    """How many processes a launcher started for this run (1 when `unizoo train` was run directly)."""
    for variable in ("WORLD_SIZE", "SLURM_NTASKS"):
        if variable in os.environ:
            return int(os.environ[variable])
    return 1


def _job_name() -> str | None:
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    return f"torchrun-{run_id}" if run_id and run_id != "none" else None


def shared_run_dir(run_root: str | Path, name: str, run_dir: str | Path | None, resume: bool) -> Path:
    """The run directory of this process: the same in every process of one launch; made by the primary."""
    if run_dir is not None:
        path = Path(run_dir).expanduser()
        if not resume and is_primary() and (path / RECIPE_FILE).is_file():
            raise RecipeError(f"run_dir={path} already holds a run; continue it with `unizoo train resume={path}` or choose a new run_dir")
        return path
    inherited = os.environ.get(RUN_DIR_VARIABLE)
    if inherited and not is_primary():
        return Path(inherited)
    if launched_processes() > 1:
        job = _job_name()
        if job is None:
            raise RecipeError(
                f"this run was launched as {launched_processes()} processes with no job id to name its run directory "
                "after: give every process the same run_dir=PATH (or launch with torchrun --standalone / --rdzv-id, or SLURM)"
            )
        return shared_run_dir(run_root, name, Path(run_root) / name / job, resume)
    return new_run_dir(run_root, name)


def share_run_dir(run_dir: Path) -> Callable[[], None]:
    """Tell the processes Lightning's launchers start from here which run directory is theirs.

    Returns the function that puts the variable back as it was (runs in one process, such
    as tests, must not inherit each other's directory).
    """
    before = os.environ.get(RUN_DIR_VARIABLE)
    os.environ[RUN_DIR_VARIABLE] = str(run_dir)

    def restore() -> None:
        if before is None:
            os.environ.pop(RUN_DIR_VARIABLE, None)
        else:
            os.environ[RUN_DIR_VARIABLE] = before

    return restore
