"""Results on disk: one JSON (everything) and one Markdown table per benchmark.

Layout: ``<out>/<machine>/<benchmark>.json`` and ``.md`` (``<benchmark>-quick.*`` for
``--quick`` runs, so smoke tests never overwrite real numbers). ``<machine>`` is a
slug such as ``cpu-amd-epyc-2c`` or ``cuda-nvidia-h100-80gb-hbm3``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from .peer_tables import peer_markdown, scaling_markdown, sections_markdown
from .tables import _fmt, _table, peaks_markdown


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def cpu_model_name() -> str:
    """``model name`` from /proc/cpuinfo on Linux, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, not the whole host)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_slug(device: torch.device) -> str:
    """``cuda-<gpu>``, or ``cpu-<model>-<cores>c`` with the vector ISA torch dispatches to
    where it is below AVX-512 (``cpu-amd-epyc-avx2-2c``).

    A model name can cover CPU generations whose numbers differ several-fold: "AMD EPYC"
    is both an AVX-512 + bf16 Zen 4 and an AVX2-only Zen 3 (fp32 matmul 0.23 against
    0.17 TFLOP/s, bf16 0.88 against an emulated 0.0013). Folders of AVX-512 machines keep
    their names.
    """
    if device.type == "cuda":
        return "cuda-" + _slug(torch.cuda.get_device_name(device))
    capability = torch.backends.cpu.get_cpu_capability()
    isa = "" if capability.startswith("AVX512") else f"-{_slug(capability)}"
    return f"cpu-{_slug(cpu_model_name())}{isa}-{cpu_cores()}c"


def _cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    match = re.search(r"^flags\s*:(.*)$", text, re.M)
    flags = set(match.group(1).split()) if match else set()
    return sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma"})


def _git(*arguments: str) -> str | None:
    try:
        done = subprocess.run(["git", *arguments], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def git_state() -> tuple[str | None, bool | None]:
    """The checkout's commit and whether tracked files differ from it (None, None outside a git checkout).

    Results written earlier (benchmarks/results) do not count: a second benchmark run after a
    first one would otherwise always be "dirty".
    """
    commit = (_git("rev-parse", "--short", "HEAD") or "").strip() or None
    if commit is None:
        return None, None
    changes = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
    return commit, None if changes is None else bool(changes.strip())


def commit_label(env: dict) -> str:
    """``commit abc1234``, with ``+ uncommitted changes`` where the tree differed from it."""
    commit = env.get("git_commit") or "unknown"
    return f"commit {commit}" + (" + uncommitted changes" if env.get("git_dirty") else "")


def environment(device: torch.device, command: str | None = None) -> dict:
    """What produced the numbers: versions, hardware, threads, commit, command line.

    `command`: the command line, for harnesses other than benchmarks.run (default: its own, from sys.argv).
    """
    try:
        import diffusers  # noqa: PLC0415

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    commit, dirty = git_state()
    return {
        "machine": machine_slug(device),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model_name(),
        "cpu_cores": cpu_cores(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": _cpu_flags(),
        "torch": torch.__version__,
        "diffusers": diffusers_version,
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": dirty,
        "command": command or " ".join(["python -m benchmarks.run", *sys.argv[1:]]),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ---------------------------------------------------------------- Markdown


def attention_markdown(result: dict, peaks: dict) -> str:
    cfg = result["config"]
    sections = []
    for precision in cfg["precisions"]:
        rows = []
        for r in result["rows"]:
            if r["precision"] != precision:
                continue
            rows.append([
                r["backend"], str(r["seq_len"]),
                _fmt(r.get("time_ms")), _fmt(r.get("sequences_per_s"), 1),
                _fmt(r.get("tflops_per_s"), 3), _fmt(r.get("fraction_of_peak"), percent=True),
                _fmt(r.get("peak_mem_mb"), 1), r["status"],
            ])
        title = (f"### Attention forward+backward ({precision}, batch {cfg['batch']}, "
                 f"{cfg['heads']} heads x {cfg['head_dim']})")
        header = ["backend", "seq len", "time (ms)", "sequences/s", "TFLOP/s",
                  f"fraction of {precision} peak", "extra memory (MiB)", "status"]
        sections += [title, _table(header, rows)]
    return "\n\n".join([*sections, peaks_markdown(peaks)])


MARKDOWN = {"attention": attention_markdown, "peer_dit": peer_markdown, "peer_pixart": sections_markdown,
            "peer_scaling": scaling_markdown}


def _strict_json(value):
    """NaN/inf (a diverged loss, say) become null: strict JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(item) for item in value]
    return value


def write_results(name: str, result: dict, env: dict, peaks: dict, out_root: Path, quick: bool,
                  kind: str | None = None) -> tuple[Path, Path, str]:
    """Write ``<out_root>/<machine>/<name>[-quick].{json,md}``; return paths and the Markdown.

    `kind`: the benchmark whose table this is, where `name` differs (peer_dit_xl is a peer_dit table).
    """
    folder = Path(out_root) / env["machine"]
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-quick" if quick else name
    payload = {"benchmark": name, "quick": quick, "environment": env, "peaks": peaks, **result}
    json_path = folder / f"{stem}.json"
    json_path.write_text(json.dumps(_strict_json(payload), indent=2, allow_nan=False) + "\n")
    header = (f"<!-- {env['command']} | {env['device_name']} | torch {env['torch']} | "
              f"{env['torch_threads']} threads | {commit_label(env)} | {env['timestamp']}"
              f"{' | QUICK: not real numbers' if quick else ''} -->")
    markdown = header + "\n\n" + MARKDOWN[kind or name](result, peaks) + "\n"
    md_path = folder / f"{stem}.md"
    md_path.write_text(markdown)
    return json_path, md_path, markdown
