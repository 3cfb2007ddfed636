"""Where a study's variants run: submitit's local executor on this machine, its SLURM executor on a cluster.

Settings come from the study file's ``launcher:`` block, then the command line:

    kind               local | slurm
    jobs               variants in flight at once (default: 1 locally, all of them on SLURM)
    partition          SLURM partition (slurm only)
    gpus_per_variant   GPUs each variant trains on; 0 = CPU. The variant's recipe gets the
                       matching trainer overrides (GPU accelerator, DDP over NCCL for more than one)
    per_device         N variants at once on each GPU (local: every GPU of the machine; slurm: N
                       variants per one-GPU job), each process seeing its one GPU; unset on a GPU
                       machine: from one variant's measured memory (unizoo.studies.packing)
    parallel           N variants at once on a CPU machine, each pinned to its share of the cores
    time_min           a variant's time limit in minutes (SLURM --time; locally, when it is killed)
    cpus_per_task, mem_gb, account, qos   SLURM resources (slurm only)
    setup              shell lines run before each job (e.g. "module load cuda", "source .venv/bin/activate")
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import submitit

from unizoo.studies.packing import Slot, consecutive_gpu_slots, cpu_slots, gpu_slots, machine_cores

LAUNCHERS = ("local", "slurm")
DAY_MIN = 24 * 60


class LauncherError(ValueError):
    """A launcher setting that is not valid: reported in one paragraph."""


@dataclass(frozen=True)
class LauncherSettings:
    kind: str = "local"
    jobs: int | None = None
    partition: str | None = None
    gpus_per_variant: int = 0
    per_device: int | None = None
    parallel: int | None = None
    time_min: int = DAY_MIN
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    account: str | None = None
    qos: str | None = None
    setup: tuple[str, ...] = ()

    @classmethod
    def from_values(cls, *layers: dict[str, Any]) -> LauncherSettings:
        """Later layers win (the study file's ``launcher:``, then the command line); None means unset."""
        valid = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for layer in layers:
            unknown = sorted(set(layer) - valid)
            if unknown:
                raise LauncherError(f"unknown launcher settings {unknown}; valid: {', '.join(sorted(valid))}")
            given = {k: v for k, v in layer.items() if v is not None}
            # jobs and parallel both say how many variants run at once: the later layer's one wins
            # (a study file's `jobs: 1` does not stop `--parallel 2` on the command line).
            for one, other in (("parallel", "jobs"), ("jobs", "parallel")):
                if one in given and other not in given:
                    values.pop(other, None)
            values.update(given)
        if "setup" in values:
            values["setup"] = tuple([values["setup"]] if isinstance(values["setup"], str) else values["setup"])
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        if self.kind not in LAUNCHERS:
            raise LauncherError(f"launcher {self.kind!r} is not known; valid: {', '.join(LAUNCHERS)}")
        for name in ("jobs", "time_min", "cpus_per_task", "per_device", "parallel"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise LauncherError(f"launcher {name} must be a whole number of at least 1, got {value!r}")
        if not isinstance(self.gpus_per_variant, int) or self.gpus_per_variant < 0:
            raise LauncherError(f"launcher gpus_per_variant must be 0 (CPU) or more, got {self.gpus_per_variant!r}")
        if self.mem_gb is not None and not (isinstance(self.mem_gb, (int, float)) and self.mem_gb > 0):
            raise LauncherError(f"launcher mem_gb must be a positive number of gigabytes, got {self.mem_gb!r}")
        if self.per_device is not None and self.gpus_per_variant > 1:
            raise LauncherError(f"--per-device packs variants of one GPU each; it cannot go with --gpus-per-variant {self.gpus_per_variant}")
        if self.parallel is not None and (self.kind != "local" or self.gpus_per_variant or self.per_device is not None):
            raise LauncherError("--parallel splits a CPU machine's cores between variants: the local launcher, without GPUs "
                                "(--per-device packs variants on GPUs)")
        if self.parallel is not None and self.jobs is not None and self.jobs != self.parallel:
            raise LauncherError(f"--jobs {self.jobs} and --parallel {self.parallel} disagree: --parallel N runs N variants at once")
        cluster_only = [n for n in ("partition", "cpus_per_task", "mem_gb", "account", "qos") if getattr(self, n) is not None]
        if self.kind == "local" and cluster_only:
            raise LauncherError(f"{', '.join(cluster_only)} only apply to --launcher slurm (the local launcher runs on this machine)")

    def require_available(self) -> None:
        """Fail before anything runs where the launcher cannot work here."""
        if self.kind == "slurm" and submitit.SlurmExecutor.affinity() < 0:
            raise LauncherError(
                "--launcher slurm needs SLURM's srun and sbatch on PATH (none found); run `unizoo study` on a "
                "cluster's login node, or use --launcher local"
            )

    def replace(self, **values: Any) -> LauncherSettings:
        return dataclasses.replace(self, **values)

    def in_flight(self, variants: int, gpu_count: int = 0) -> int:
        """How many variants run at once (`gpu_count`: the machine's GPUs, for --per-device)."""
        if self.kind == "local" and self.per_device is not None:
            return self.per_device * max(1, gpu_count)
        if self.parallel is not None:
            return self.parallel
        if self.jobs is not None:
            return self.jobs
        return 1 if self.kind == "local" else max(1, variants)

    def slots(self, in_flight: int, gpu_count: int = 0) -> list[Slot]:
        """Where the variants in flight run: GPUs each sees, cores each is pinned to (unizoo.studies.packing)."""
        if self.kind == "local" and self.per_device is not None:
            return gpu_slots(self.per_device, max(1, gpu_count))
        if self.parallel is not None:
            return cpu_slots(self.parallel, machine_cores())
        return consecutive_gpu_slots(in_flight, self.gpus_per_variant)

    def recipe_overrides(self) -> tuple[str, ...]:
        """Trainer overrides that put a variant on its GPUs (none on CPU)."""
        gpus = 1 if self.per_device is not None else self.gpus_per_variant
        if gpus == 0:
            return ()
        if gpus == 1:
            return ("trainer.accelerator=gpu", "trainer.devices=1")
        # One process per GPU: on SLURM the job's tasks are the ranks (Lightning reads SLURM's
        # environment); locally Lightning spawns them.
        return ("trainer=ddp_cpu", "trainer.accelerator=gpu", f"trainer.devices={gpus}",
                "trainer.strategy.process_group_backend=nccl")

    def executor(self, folder: Path, name: str, slot: Slot | None = None) -> submitit.Executor:
        """A submitit executor for one variant (or, slurm with --per-device, one GPU job of several); ``slot``
        gives a local variant its GPUs."""
        if self.kind == "local":
            executor = submitit.LocalExecutor(folder=folder)
            gpus = (slot.gpus if slot is not None else ()) or tuple(range(self.gpus_per_variant))
            executor.update_parameters(timeout_min=self.time_min, gpus_per_node=len(gpus), visible_gpus=gpus, setup=list(self.setup))
            return executor
        try:
            executor = submitit.SlurmExecutor(folder=folder)
        except RuntimeError as error:
            raise LauncherError(
                f"--launcher slurm needs SLURM's srun and sbatch on PATH ({error}); run `unizoo study` on a "
                "cluster's login node, or use --launcher local"
            ) from None
        # --per-device: one task on one GPU runs its variants side by side (unizoo.studies.variant.run_variant_group).
        tasks = 1 if self.per_device is not None else max(1, self.gpus_per_variant)
        parameters = dict(
            job_name=name, time=self.time_min, nodes=1, ntasks_per_node=tasks, partition=self.partition,
            cpus_per_task=self.cpus_per_task, account=self.account, qos=self.qos, setup=list(self.setup) or None,
            gpus_per_node=(1 if self.per_device is not None else self.gpus_per_variant) or None, mem=_memory(self.mem_gb),
        )
        executor.update_parameters(**{k: v for k, v in parameters.items() if v is not None})
        return executor


def _memory(gigabytes: float | None) -> str | None:
    """sbatch's --mem: whole gigabytes as GB, else megabytes."""
    if gigabytes is None:
        return None
    return f"{int(gigabytes)}GB" if gigabytes == int(gigabytes) else f"{int(gigabytes * 1024)}MB"
