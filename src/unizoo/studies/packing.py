"""How a study's variants share a machine: several per GPU (`--per-device N`), or a CPU's cores split (`--parallel N`).

A variant of the default size needs seconds of a big GPU's compute and a sliver of its
memory, so one variant per GPU leaves it idle. With `--per-device N` the local launcher runs
N variants at once on each GPU of the machine, each process seeing only its own GPU
(`CUDA_VISIBLE_DEVICES`). Without N, it is taken from a memory estimate: one variant's
model, built and trained for one step on the GPU, measured (`estimate_per_device`).
`--parallel N` does the same on a CPU: N variants at once, each pinned to its share of the
cores, with as many torch threads as cores it holds.

A slot is one place a variant runs in; the runner gives each running variant a free slot.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

log = logging.getLogger("unizoo")

CUDA_CONTEXT_BYTES = 600 * 2**20  # what each process holds on a GPU before its first tensor (CUDA context, kernels)
MEMORY_HEADROOM = 0.85  # share of a GPU's memory the packed variants may plan for (evaluation, fragmentation)
MAX_PER_DEVICE = 16  # beyond this, CPU work (data, Python) of the variants is what they wait for


@dataclass(frozen=True)
class Slot:
    """Where one variant runs: the GPUs it sees, the cores it is pinned to and its torch threads (empty/None: no limit)."""

    index: int
    gpus: tuple[int, ...] = ()
    cpus: tuple[int, ...] = ()
    threads: int | None = None

    def describe(self) -> str:
        parts = []
        if self.gpus:
            parts.append(f"GPU {','.join(map(str, self.gpus))}")
        if self.cpus:
            parts.append(f"cores {self.cpus[0]}-{self.cpus[-1]}" if len(self.cpus) > 1 else f"core {self.cpus[0]}")
        return ", ".join(parts) or "this machine"


def machine_cores() -> tuple[int, ...]:
    """The cores this process may run on."""
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except AttributeError:
        return tuple(range(os.cpu_count() or 1))


def gpu_slots(per_device: int, gpu_count: int) -> list[Slot]:
    """`per_device` slots on each of `gpu_count` GPUs, GPU by GPU interleaved (the first variants spread over every GPU)."""
    return [Slot(index=k * gpu_count + gpu, gpus=(gpu,)) for k in range(per_device) for gpu in range(gpu_count)]


def cpu_slots(parallel: int, cores: tuple[int, ...]) -> list[Slot]:
    """`parallel` slots, each pinned to its own contiguous share of `cores` (the remainder to the first ones)."""
    if parallel > len(cores):
        raise ValueError(f"--parallel {parallel} asks for more variants at once than this machine's {len(cores)} cores")
    size, extra = divmod(len(cores), parallel)
    slots, start = [], 0
    for index in range(parallel):
        share = cores[start : start + size + (index < extra)]
        start += len(share)
        slots.append(Slot(index=index, cpus=share, threads=len(share)))
    return slots


def consecutive_gpu_slots(count: int, gpus_per_variant: int) -> list[Slot]:
    """`count` slots of `gpus_per_variant` GPUs each (0: CPU slots without limits), as `--jobs N` gives them."""
    return [Slot(index=i, gpus=tuple(range(i * gpus_per_variant, (i + 1) * gpus_per_variant))) for i in range(count)]


def per_device_from_memory(peak_bytes: int, device_bytes: int) -> int:
    """How many variants of `peak_bytes` (one training step's peak, measured) fit on a device of `device_bytes`."""
    need = peak_bytes + CUDA_CONTEXT_BYTES
    return max(1, min(MAX_PER_DEVICE, math.floor(MEMORY_HEADROOM * device_bytes / need)))


def estimate_per_device(recipe, device_index: int = 0) -> tuple[int, int]:
    """(variants per GPU, one variant's measured peak bytes): one training step of `recipe`'s model on the GPU."""
    import torch  # noqa: PLC0415 - heavy imports only where a GPU study asks for an estimate
    from hydra.utils import instantiate  # noqa: PLC0415

    from unizoo.runtime.fabric import loops_on  # noqa: PLC0415
    from unizoo.runtime.precision import compute_dtype  # noqa: PLC0415
    from unizoo.training.build import build_model  # noqa: PLC0415

    device = torch.device("cuda", device_index)
    # cuda:<index>, not gpu: a representation that pretrains while the model is built does it on the GPU measured.
    with loops_on(str(device), recipe.trainer.precision), torch.random.fork_rng(devices=[device_index]):
        model = build_model(recipe)
        stage = instantiate(recipe.strategy).stages[-1]
        model.set_stage(stage)
        data = instantiate(recipe.data, _convert_="all")
        data.setup("fit")
        batch = next(iter(data.train_dataloader()))
        batch = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
        model.to(device).train()
        optimizer = model.optimizer_factory([p for p in model.parameters() if p.requires_grad])
        torch.cuda.reset_peak_memory_stats(device)
        dtype = compute_dtype(recipe.trainer.precision)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            losses = model.stage_losses(batch)
            total = sum(model.stage.losses[name] * value for name, value in losses.items())
        total.backward()
        optimizer.step()
        peak = torch.cuda.max_memory_allocated(device)
        free, total_bytes = torch.cuda.mem_get_info(device)
        del model, optimizer, batch, losses, total
        torch.cuda.empty_cache()
    per_device = per_device_from_memory(peak, total_bytes)
    log.info("study: one variant's training step peaks at %.2f GiB on %s (%.0f GiB): %d variants per GPU",
             peak / 2**30, torch.cuda.get_device_name(device), total_bytes / 2**30, per_device)
    return per_device, peak
