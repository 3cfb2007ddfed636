"""The "why" column: which op makes unizoo's step slower than the peer's.

Three warm steps of each side run under ``torch.profiler`` (CPU activity; on CUDA the
device time too). Per op name (``aten::addmm``, ...) the self time is the median of the
three, and the op whose self time grew most from the peer to unizoo is named. Self
time, not total: a parent op (``aten::linear``) would otherwise be charged for its
children and show up next to them.

A compiled step runs inductor's generated C++ kernels, which the profiler does not see
unless they record themselves: ``kernel_profiling()`` turns that on for the step being
compiled, so a compiled row's "why" names a fused kernel (``cpp_fused_add_mul_...``)
rather than the whole graph. Kernel names carry their graph's number and an index
that differ from model to model; ``op_name`` drops both, so the same fusion on the two
sides is one name.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch.profiler import ProfilerActivity, profile

# Profiler bookkeeping, not work: never "the op that costs it".
_IGNORED = ("ProfilerStep", "[memory]", "Torch-Compiled Region", "CompiledFunction")

# What is left of a compiled graph's own record once its kernels record themselves: the
# Python wrapper between kernels. Its key carries the graph's cache hash, unique per model.
COMPILED_GRAPH = "compiled graph, outside its kernels"
_KERNEL = re.compile(r"^(?:graph_\d+_)?(cpp_fused_\w*?)(?:_\d+)?$")


def op_name(key: str) -> str:
    """The name an op is compared under: fused kernels and compiled graphs without their per-model numbers."""
    if key.startswith("## Call CompiledFxGraph"):
        return COMPILED_GRAPH
    kernel = _KERNEL.match(key)
    return kernel.group(1) if kernel else key


def kernel_profiling() -> AbstractContextManager:
    """While a step compiles inside this, its C++ kernels record themselves to the profiler.

    Only the profiled steps compile under it: a timed row's kernels stay as they ship.
    """
    import torch._inductor.config as inductor_config  # noqa: PLC0415 - inductor loads lazily

    return inductor_config.patch({"cpp.enable_kernel_profile": True})


def _one_profile(step: Callable[[], object], device: torch.device) -> dict[str, float]:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    times: dict[str, float] = {}
    for event in prof.key_averages():
        if any(event.key.startswith(name) for name in _IGNORED):
            continue
        own = event.self_cpu_time_total + (getattr(event, "self_device_time_total", 0) or 0)
        name = op_name(event.key)
        times[name] = times.get(name, 0.0) + own
    return times


def self_time_by_op(step: Callable[[], object], device: torch.device, repeats: int = 3) -> dict[str, float]:
    """Self time in microseconds of every op ``step()`` runs, per op name: the median of ``repeats`` calls.

    The median per op drops the call in which the process was descheduled, which a
    single profile would charge to whichever op happened to be running.
    """
    runs = [_one_profile(step, device) for _ in range(repeats)]
    ops = set().union(*runs)
    return {op: statistics.median(run.get(op, 0.0) for run in runs) for op in ops}


def top_difference(unizoo: dict[str, float], peer: dict[str, float]) -> dict:
    """The op whose self time grew most from ``peer`` to ``unizoo`` (microsecond dicts)."""
    ops = set(unizoo) | set(peer)
    op = max(ops, key=lambda name: unizoo.get(name, 0.0) - peer.get(name, 0.0))
    return {
        "op": op,
        "unizoo_ms": unizoo.get(op, 0.0) / 1e3,
        "peer_ms": peer.get(op, 0.0) / 1e3,
        "difference_ms": (unizoo.get(op, 0.0) - peer.get(op, 0.0)) / 1e3,
        "unizoo_total_ms": sum(unizoo.values()) / 1e3,
        "peer_total_ms": sum(peer.values()) / 1e3,
    }


def why_text(difference: dict, peer_name: str) -> str:
    if difference["difference_ms"] <= 0:  # the timed steps were slower, the profiled one was not
        return (f"no op slower in the profiled step (unizoo {difference['unizoo_total_ms']:.1f} ms self time in all, "
                f"{peer_name} {difference['peer_total_ms']:.1f}): the timed gap is noise")
    return (f"{difference['op']} +{difference['difference_ms']:.1f} ms self time "
            f"(unizoo {difference['unizoo_ms']:.1f}, {peer_name} {difference['peer_ms']:.1f})")
