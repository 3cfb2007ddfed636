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
    if device.type == "cuda":
        return "cuda-" + _slug(torch.cuda.get_device_name(device))
    return f"cpu-{_slug(cpu_model_name())}-{cpu_cores()}c"


def _cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    match = re.search(r"^flags\s*:(.*)$", text, re.M)
    flags = set(match.group(1).split()) if match else set()
    return sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma"})


def environment(device: torch.device) -> dict:
    """What produced the numbers: versions, hardware, threads, commit, command line."""
    try:
        import diffusers  # noqa: PLC0415

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=False).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
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
        "command": " ".join(["python -m benchmarks.run", *sys.argv[1:]]),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ---------------------------------------------------------------- Markdown


def _fmt(value, digits: int = 2, percent: bool = False) -> str:
    if value is None:
        return "–"
    if percent:
        return f"{100 * value:.1f}%"
    return f"{value:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def peaks_markdown(peaks: dict) -> str:
    rows = []
    for name, peak in peaks.items():
        rate = peak["flops_per_s"] / 1e12 if peak["flops_per_s"] else None
        rows.append([name, _fmt(rate, 3), str(peak["matmul_n"]), peak["note"]])
    return _table(["precision", "measured peak (TFLOP/s)", "matmul n", "how"], rows)


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


def peer_markdown(result: dict, peaks: dict) -> str:
    cfg, params = result["config"], result["parameters"]
    checks = {c["variant"]: c for c in result["loss_checks"]}
    rows = []
    for r in result["rows"]:
        check = checks.get(r["name"])
        verdict = "reference" if r["status"] == "ok" and not check and r["name"].endswith("fp32") else "–"
        if check:
            verdict = f"{'pass' if check['passed'] else 'FAIL'} ({check['max_rel_diff']:.1e})"
        rows.append([
            r["name"], _fmt(r["params"] / 1e6), r["switches"], _fmt(r.get("step_ms"), 1), _fmt(r.get("images_per_s")),
            _fmt(r.get("vs_diffusers_fp32")), _fmt(r.get("vs_diffusers_bf16")),
            _fmt(r.get("tflops_per_s"), 3), _fmt(r.get("mfu"), percent=True),
            _fmt(r.get("peak_mem_mb"), 0), _fmt(r.get("first_step_s"), 1), verdict, r["status"],
        ])
    header = ["variant", "params (M)", "switches", "step (ms)", "images/s", "x diffusers fp32", "x diffusers bf16",
              "TFLOP/s", "MFU (fraction of measured peak)", "peak memory (MiB)", "first step (s)",
              "loss vs fp32 (max rel diff)", "status"]
    tolerances = ", ".join(f"{k} {v:.0e}" if v < 0.01 else f"{k} {100 * v:.0f}%"
                           for k, v in result["tolerance_rel"].items())
    notes = [
        f"### One training step (forward, MSE, backward, AdamW): {cfg['label']}",
        f"Parameters: unizoo {params['unizoo'] / 1e6:.2f}M, diffusers {params['diffusers'] / 1e6:.2f}M. "
        f"Model FLOPs per step (forward + backward): unizoo {result['flops_per_step']['unizoo'] / 1e9:.4g} G, "
        f"diffusers {result['flops_per_step']['diffusers'] / 1e9:.4g} G. Not the same model: diffusers' DiT is "
        "class-conditional (class_labels + integer timestep into adaLN-Zero); unizoo's DiT takes a condition "
        "sequence, here one (B, 1, width) token, read by cross-attention in every block (over a single key "
        "that is exactly a per-sample linear map, which is how unizoo computes it).",
        f"{cfg['steps']} steps per variant from the same init on the same data; the first {cfg['warmup']} "
        f"untimed, median of {cfg['timed_steps']} timed. Loss check: every step's loss within a relative "
        f"tolerance ({tolerances}) of the same family's fp32 eager loss (unizoo's zero-initialised "
        "matrices are re-drawn first, so every block takes part from step 1). MFU: model FLOPs per "
        "second over the measured matmul peak at the row's precision (checkpointing's recompute not counted).",
    ]
    return "\n\n".join([*notes, _table(header, rows), peaks_markdown(peaks)])


MARKDOWN = {"attention": attention_markdown, "peer_dit": peer_markdown}


def _strict_json(value):
    """NaN/inf (a diverged loss, say) become null: strict JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(item) for item in value]
    return value


def write_results(name: str, result: dict, env: dict, peaks: dict, out_root: Path, quick: bool) -> tuple[Path, Path, str]:
    """Write ``<out_root>/<machine>/<name>[-quick].{json,md}``; return paths and the Markdown."""
    folder = Path(out_root) / env["machine"]
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-quick" if quick else name
    payload = {"benchmark": name, "quick": quick, "environment": env, "peaks": peaks, **result}
    json_path = folder / f"{stem}.json"
    json_path.write_text(json.dumps(_strict_json(payload), indent=2, allow_nan=False) + "\n")
    header = (f"<!-- {env['command']} | {env['device_name']} | torch {env['torch']} | "
              f"{env['torch_threads']} threads | {env['timestamp']}{' | QUICK: not real numbers' if quick else ''} -->")
    markdown = header + "\n\n" + MARKDOWN[name](result, peaks) + "\n"
    md_path = folder / f"{stem}.md"
    md_path.write_text(markdown)
    return json_path, md_path, markdown
