"""Measuring primitives: wall time, operators dispatched, peak memory, FLOPs and the measured peak FLOP/s.

* Time: warm-up calls, then the median of timed calls (``time.perf_counter``; CUDA is
  synchronised before each clock read so queued kernels are inside the interval).
* Operators: the aten operators a region dispatches (``TorchDispatchMode``), views apart;
  on a GPU most of them launch a kernel, so their count is what the host pays per step.
* Memory: the extra memory a measured region needed beyond what was live when it
  started. CUDA: ``torch.cuda.max_memory_allocated`` (tensors only, allocator cache
  excluded). CPU: the process' resident-set high-water mark, which the kernel keeps
  for the whole process; on Linux we reset it (``/proc/self/clear_refs``) at the start
  of the region, so the delta belongs to the region. Without that reset we report the
  ``resource.getrusage`` delta, a lower bound (0 if the process once peaked higher);
  ``memory_method()`` names the method and results record it.
* FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one call. Fused attention
  kernels are counted as *model* FLOPs (see ``ATTENTION_MODEL_FLOPS``), so every
  attention kernel of the same problem gets the same count.
* Peak: the measured rate of a large square matmul at the given precision. MFU is
  achieved FLOP/s divided by that peak (nanoGPT's ``estimate_mfu`` divides by a
  datasheet number; a measured one is honest on CPUs, which have no datasheet peak
  for a given core count, clock and thread setting).
"""

from __future__ import annotations

import ctypes
import gc
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from unizoo.runtime.precision import cpu_computes_bf16

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds per timed call; ``median_s`` is what tables report."""

    times_s: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)


def time_call(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed one by one."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        fn()
    timing = Timing()
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        timing.times_s.append(time.perf_counter() - start)
    return timing


# ---------------------------------------------------------------- operators


class OperatorCount(TorchDispatchMode):
    """Counts the aten operators dispatched inside it; views (a new header on the same storage) apart."""

    def __init__(self) -> None:
        super().__init__()
        self.operators = self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if getattr(func, "is_view", False):  # a custom or higher-order operator may not say: counted as an operator
            self.views += 1
        else:
            self.operators += 1
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------- memory


def _status_kib(key: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _can_reset_rss_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        _status_kib("VmHWM")
        return True
    except (OSError, KeyError):
        return False


def _rusage_peak_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _release_freed_memory() -> None:
    """Return freed heap pages to the OS, so the starting RSS is live memory only."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_method(device: torch.device) -> str:
    """How :class:`PeakMemory` measures on ``device`` (recorded with the results)."""
    if device.type == "cuda":
        return "cuda max_memory_allocated - allocated at start"
    if _can_reset_rss_peak():
        return "process peak RSS (VmHWM, reset at start) - RSS at start"
    return "getrusage ru_maxrss delta (lower bound: process high-water mark)"


class PeakMemory:
    """Context manager: ``.bytes`` = peak memory in the region minus memory at its start."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes = 0

    def __enter__(self) -> PeakMemory:
        _release_freed_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self._read = lambda: torch.cuda.max_memory_allocated(self.device)
        elif _can_reset_rss_peak():  # resets VmHWM to the current RSS
            self._start = _status_kib("VmRSS") * 1024
            self._read = lambda: _status_kib("VmHWM") * 1024
        else:
            self._start = _rusage_peak_bytes()
            self._read = _rusage_peak_bytes
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.bytes = max(0, self._read() - self._start)


# ---------------------------------------------------------------- FLOPs


def _fused_attention_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _fused_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    # Model FLOPs: backward = 2x forward (dS and dV, then dQ and dK). PyTorch's own
    # formula adds the recomputation of the scores that fused kernels do, which would
    # make a fused kernel look like more work than the math path for the same model.
    return 2 * sdpa_flop_count(query, key, value)


_aten = torch.ops.aten
_FUSED_FORWARD = [
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
]
# Every fused SDPA op takes (q, k, v, ...) [B, H, M, K]; every backward (grad_out, q, k, v, ...).
# The CPU flash kernel has no formula in PyTorch at all, so without this it counts 0.
ATTENTION_MODEL_FLOPS = {
    **{getattr(_aten, op): _fused_attention_forward for op in _FUSED_FORWARD if hasattr(_aten, op)},
    **{
        getattr(_aten, op + "_backward"): _fused_attention_backward
        for op in _FUSED_FORWARD
        if hasattr(_aten, op + "_backward")
    },
}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (multiply-add = 2) of the matmul/conv/attention ops ``fn`` runs, once.

    Elementwise ops, norms, softmax and optimizer updates are not counted, the usual
    convention for MFU. Attention counts the same under every kernel.
    """
    with FlopCounterMode(display=False, custom_mapping=ATTENTION_MODEL_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


# ---------------------------------------------------------------- measured peak


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, warmup: int, repeats: int) -> float:
    """FLOP/s of an ``n x n @ n x n`` matmul (2 n^3 FLOPs) at ``dtype``: the median call."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    timing = time_call(lambda: torch.mm(a, b), device, warmup, repeats)
    return 2 * n**3 / timing.median_s


# An emulated bf16 matmul on a CPU without bf16 instructions runs about 100x slower than
# fp32 (0.0013 against 0.17 TFLOP/s on an AVX2-only AMD EPYC): at n = 4096 one call takes
# about two minutes, so the peak is measured at this size there, where a call takes 0.2 s.
EMULATED_BF16_N = 512


def bf16_is_emulated(device: torch.device) -> bool:
    """Whether bf16 on `device` is a software emulation (a CPU without AVX512-BF16 or AMX).

    The one test behind every benchmark's handling of it: the small peak matmul here, the
    attention benchmark's default precisions, the peer benchmark's skipped bf16 rows.
    """
    return device.type == "cpu" and not cpu_computes_bf16()


def measured_peaks(device: torch.device, n: int, repeats: int, precisions=("fp32", "bf16")) -> dict:
    """``{precision: {"flops_per_s": float | None, "matmul_n": int, "note": str}}``.

    fp32 on CUDA is true fp32 (TF32 stays off unless the caller enabled it). A
    precision the device cannot run gets ``None`` and the reason in ``note``. bf16 on a
    CPU without bf16 instructions is measured at ``min(n, EMULATED_BF16_N)`` and says so.
    """
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    peaks = {}
    for name in precisions:
        size, note = n, "torch.mm, median" + (" (TF32 enabled)" if tf32 and name == "fp32" else "")
        if name == "bf16" and bf16_is_emulated(device):
            size = min(n, EMULATED_BF16_N)
            note += ", emulated: this CPU has no bf16 instructions (AVX512-BF16 or AMX)"
        try:
            rate = matmul_rate(device, DTYPES[name], size, warmup=1, repeats=repeats)
            peaks[name] = {"flops_per_s": rate, "matmul_n": size, "note": note}
        except RuntimeError as error:  # e.g. a dtype with no matmul kernel here
            peaks[name] = {"flops_per_s": None, "matmul_n": size, "note": f"unavailable: {error}"}
    return peaks


def mfu(flops: float, seconds: float, peak_flops_per_s: float | None) -> float | None:
    """Model FLOPs utilisation: (flops / seconds) / peak; None without a peak."""
    if not peak_flops_per_s or seconds <= 0:
        return None
    return flops / seconds / peak_flops_per_s
