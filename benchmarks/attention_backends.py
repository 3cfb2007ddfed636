"""Attention kernels alone: forward + backward of ``attention()`` per backend and length.

One row per (backend, sequence length): median seconds of forward+backward of
self-attention on random ``[B, L, H, K]`` q, k, v, the extra memory it needed, the
model FLOP rate and its fraction of the measured matmul peak at the same precision.
A backend that cannot run here (xformers without CUDA or without the package) gets a
row whose status is ``"skipped: <reason>"``; one that runs out of memory ``"failed: ..."``.

FLOPs are analytical model FLOPs, the same for every kernel:
forward ``q kᵀ`` and ``p v`` = 2 matmuls of ``2·B·H·L²·K``; backward twice that
(``12·B·H·L²·K`` in all). Kernels that recompute the scores in backward do more work
than this, and the "math" backend computes in fp32 whatever the input dtype.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass

import torch

from unizoo.components.generators.attention import attention, probe

from .measure import DTYPES, PeakMemory, mfu, time_call

BACKENDS = ("math", "sdpa", "gemm", "xformers")
DEFAULT_SEQ_LENS = tuple(2**p for p in range(6, 13))  # 64 .. 4096


@dataclass
class AttentionConfig:
    seq_lens: tuple[int, ...] = DEFAULT_SEQ_LENS
    batch: int = 4
    heads: int = 6
    head_dim: int = 64
    precisions: tuple[str, ...] = ("fp32",)
    backends: tuple[str, ...] = BACKENDS
    warmup: int = 2
    repeats: int = 5

    @classmethod
    def quick(cls, precisions: tuple[str, ...] = ("fp32",)) -> AttentionConfig:
        return cls(seq_lens=(64, 128), batch=1, heads=2, head_dim=16, precisions=precisions, warmup=1, repeats=2)


def attention_flops(batch: int, seq_len: int, heads: int, head_dim: int) -> int:
    """Model FLOPs of self-attention forward + backward: ``12·B·H·L²·K``."""
    return 12 * batch * heads * seq_len**2 * head_dim


def unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype = torch.float32, head_dim: int = 64) -> str | None:
    """Why ``backend`` cannot run on ``device`` (None if it can): missing, no CUDA, or its kernel failing the probe.

    The probe is the one `auto` runs (`attention.probe`): an xformers wheel built for another
    torch imports but fails it, and its rows say why instead of stopping the benchmark.
    """
    if backend != "xformers":
        return None
    reasons = []
    if importlib.util.find_spec("xformers") is None:
        reasons.append("xformers not installed")
    if device.type != "cuda":
        reasons.append(f"xformers needs CUDA (running on {device.type})")
    if not reasons:
        return probe("xformers", device, dtype, head_dim)
    return "; ".join(reasons)


def _is_oom(error: BaseException) -> bool:
    message = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in message or "not enough memory" in message


def measure_one(backend: str, seq_len: int, precision: str, cfg: AttentionConfig, device: torch.device,
                peaks: dict) -> dict:
    """One row: time/memory/FLOP rate of forward+backward at ``seq_len`` in ``precision`` (see module doc)."""
    row = {"backend": backend, "seq_len": seq_len, "batch": cfg.batch, "heads": cfg.heads,
           "head_dim": cfg.head_dim, "precision": precision, "status": "ok"}
    reason = unavailable_reason(backend, device, DTYPES[precision], cfg.head_dim)
    if reason:
        return {**row, "status": f"skipped: {reason}"}
    dtype = DTYPES[precision]
    generator = torch.Generator(device="cpu").manual_seed(seq_len)
    shape = (cfg.batch, seq_len, cfg.heads, cfg.head_dim)
    q, k, v = (
        torch.randn(shape, generator=generator).to(device, dtype).requires_grad_() for _ in range(3)
    )
    grad_out = torch.randn(shape, generator=generator).to(device, dtype)

    def step():
        for tensor in (q, k, v):
            tensor.grad = None
        attention(q, k, v, backend=backend).backward(grad_out)

    try:
        with PeakMemory(device) as memory:
            timing = time_call(step, device, cfg.warmup, cfg.repeats)
    except (RuntimeError, torch.OutOfMemoryError) as error:
        if not _is_oom(error):
            raise
        q = k = v = grad_out = None  # drop the inputs (and step's view of them) before emptying the cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {**row, "status": "failed: out of memory"}
    flops = attention_flops(cfg.batch, seq_len, cfg.heads, cfg.head_dim)
    seconds = timing.median_s
    peak = peaks.get(precision, {}).get("flops_per_s")
    return {
        **row,
        "time_ms": seconds * 1e3,
        "times_ms": [t * 1e3 for t in timing.times_s],
        "sequences_per_s": cfg.batch / seconds,
        "peak_mem_mb": memory.bytes / 2**20,
        "flops": flops,
        "tflops_per_s": flops / seconds / 1e12,
        "fraction_of_peak": mfu(flops, seconds, peak),
    }


def run_attention(cfg: AttentionConfig, device: torch.device, peaks: dict, progress=print) -> dict:
    """All rows (precisions, then lengths, then backends) plus the configuration used."""
    rows = []
    for precision in cfg.precisions:
        for seq_len in cfg.seq_lens:
            for backend in cfg.backends:
                row = measure_one(backend, seq_len, precision, cfg, device, peaks)
                rows.append(row)
                label = f"attention {precision} {backend:>8} L={seq_len:<5}"
                if row["status"] == "ok":
                    progress(f"{label} {row['time_ms']:9.2f} ms  {row['peak_mem_mb']:8.1f} MiB  "
                             f"{row['tflops_per_s']:.3f} TFLOP/s")
                else:
                    progress(f"{label} {row['status']}")
    return {"config": asdict(cfg), "rows": rows}
