"""Per-row limits: a row that cannot fit this machine's memory or time says so instead of failing.

Two checks before a row runs, both estimates stated as such in the status:

* memory: weights, gradients and AdamW state (16 bytes a parameter in fp32) plus the
  activations a transformer keeps for backward, after Korthikanti et al. 2022
  ("Reducing Activation Recomputation in Large Transformer Models", eq. 2:
  ``s·b·h·(34 + 5·a·s/h)`` bytes a layer in mixed 16-bit training, as a bf16 row runs;
  twice that in fp32). At DiT-S/2, batch 8, fp32, it gives 1.6 GiB against the 1.4-1.6 GiB
  measured on a CPU. On CUDA the ``5·a·s/h`` term, the attention scores, is left out: sdpa's
  fused kernels there never write them. Compared with ``memory_fraction`` of the memory the row
  runs in: the host's ``MemAvailable`` on a CPU, the GPU's free memory on CUDA (the host's
  would skip every DiT-XL/2 row of batch 256 on a GPU whose own memory fits the bf16 ones).
* time: the lower bound ``steps x FLOPs per step / measured peak`` (100% MFU). A row
  that could not finish within ``time_limit_s`` even at the peak is not started.

And one while it runs: :class:`StepClock` stops a row whose steps have taken longer than
``time_limit_s`` (the estimate is a lower bound, real steps are slower).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GIB = 2**30


@dataclass(frozen=True)
class RowLimits:
    time_limit_s: float | None = 900.0  # None: no time limit
    memory_fraction: float = 0.8  # of MemAvailable when the row starts


class RowTooSlow(RuntimeError):
    """A row ran past its time limit; ``status`` is the row's status line."""

    def __init__(self, status: str):
        super().__init__(status)
        self.status = status


def available_bytes() -> int | None:
    """``MemAvailable`` from /proc/meminfo (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def estimated_step_bytes(cfg, params: int, precision: str = "fp32", scores_kept: bool = True) -> int:
    """Memory a training step of ``cfg`` (a PeerConfig) needs at ``precision`` (see the module docstring).

    ``scores_kept``: the attention keeps its ``s x s`` scores for backward (False for a fused kernel).
    """
    s, b, h, a = cfg.num_tokens, cfg.batch, cfg.hidden, cfg.heads
    scores = 5 * a * s / h if scores_kept else 0
    activations = cfg.depth * s * b * h * (34 + scores) * (2 if precision == "fp32" else 1)
    return int(16 * params + activations)


def free_bytes_on(device) -> int | None:
    """Memory a row on ``device`` can take: the GPU's free memory on CUDA, the host's ``MemAvailable`` elsewhere."""
    if device is not None and device.type == "cuda":
        import torch  # noqa: PLC0415 - this module is imported by tests that never touch a device

        return torch.cuda.mem_get_info(device)[0]
    return available_bytes()


def precheck(cfg, params: int, flops: int, steps: int, peak_flops_per_s: float | None, limits: RowLimits,
             free_bytes: int | None = None, precision: str = "fp32", device=None) -> str | None:
    """A ``skipped: ...`` status if the row cannot run within ``limits``, else None."""
    on_gpu = device is not None and device.type == "cuda"
    needed = estimated_step_bytes(cfg, params, precision, scores_kept=not on_gpu)
    free_bytes = free_bytes_on(device) if free_bytes is None else free_bytes
    if free_bytes is not None and needed > limits.memory_fraction * free_bytes:
        return (f"skipped: memory: needs about {needed / GIB:.1f} GiB (estimate, {precision}), "
                f"{limits.memory_fraction:.0%} of the {free_bytes / GIB:.1f} GiB "
                f"{'free on the GPU' if on_gpu else 'available'} is the limit")
    if limits.time_limit_s is not None and peak_flops_per_s:
        lower_bound = steps * flops / peak_flops_per_s
        if lower_bound > limits.time_limit_s:
            return (f"skipped: time: {steps} steps take at least {lower_bound:.0f} s at the measured peak, "
                    f"over the row limit of {limits.time_limit_s:.0f} s")
    return None


class StepClock:
    """Call :meth:`check` with each step's seconds: raises :class:`RowTooSlow` once the row is over its limit.

    Counts the row's own steps only, so a row timed in alternation with another
    (``peer_dit.measure_together``) is not charged for the other's steps.
    """

    def __init__(self, limits: RowLimits, steps: int):
        self.limit = limits.time_limit_s
        self.steps = steps
        self.done = 0
        self.elapsed = 0.0

    def check(self, step_seconds: float) -> None:
        self.done += 1
        self.elapsed += step_seconds
        if self.limit is not None and self.elapsed > self.limit and self.done < self.steps:
            raise RowTooSlow(f"stopped: time: {self.done} of {self.steps} steps took {self.elapsed:.0f} s, "
                             f"over the row limit of {self.limit:.0f} s")
