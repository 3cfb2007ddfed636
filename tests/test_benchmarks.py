"""The benchmark harness (benchmarks/, not installed): runs end to end and reports sanely.

A test of the harness, not of the numbers: ``--quick`` shrinks every size, and no
assertion depends on how fast anything ran.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a top-level package of the repository, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks.attention_backends import AttentionConfig, attention_flops  # noqa: E402
from benchmarks.measure import PeakMemory, count_flops, memory_method, time_call  # noqa: E402
from benchmarks.peer_dit import REFERENCE, VARIANTS  # noqa: E402
from benchmarks.report import machine_slug  # noqa: E402
from unizoo.components.generators.attention import attention  # noqa: E402

ON_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``python -m benchmarks.run all --quick`` from the repository root, into a tmp dir."""
    out = tmp_path_factory.mktemp("bench")
    process = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "all", "--quick", "--device", "cpu", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    folders = list(out.iterdir())
    assert len(folders) == 1, folders
    folder = folders[0]
    return {
        "folder": folder,
        "stdout": process.stdout,
        "stderr": process.stderr,
        "attention": json.loads((folder / "attention-quick.json").read_text()),
        "peer": json.loads((folder / "peer_dit-quick.json").read_text()),
        "attention_md": (folder / "attention-quick.md").read_text(),
        "peer_md": (folder / "peer_dit-quick.md").read_text(),
    }


def _positive_finite(row: dict, keys) -> None:
    for key in keys:
        value = row[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (row.get("name"), key, value)


def test_results_land_in_a_machine_folder(quick_run):
    folder = quick_run["folder"]
    assert folder.name == machine_slug(torch.device("cpu"))
    assert re.fullmatch(r"cpu-[a-z0-9-]+-\d+c", folder.name)
    for result in (quick_run["attention"], quick_run["peer"]):
        assert result["quick"] is True
        assert result["environment"]["machine"] == folder.name
        for peak in result["peaks"].values():
            assert peak["flops_per_s"] is None or (math.isfinite(peak["flops_per_s"]) and peak["flops_per_s"] > 0)
        assert result["peaks"]["fp32"]["flops_per_s"] > 0


def test_attention_rows(quick_run):
    result = quick_run["attention"]
    expected = {(b, n) for b in ("math", "sdpa", "xformers") for n in AttentionConfig.quick().seq_lens}
    assert {(r["backend"], r["seq_len"]) for r in result["rows"]} == expected
    for row in result["rows"]:
        if row["backend"] == "xformers":
            continue
        assert row["status"] == "ok", row
        _positive_finite(row, ["time_ms", "sequences_per_s", "flops", "tflops_per_s", "fraction_of_peak"])
        assert math.isfinite(row["peak_mem_mb"]) and row["peak_mem_mb"] >= 0  # a tiny region may not grow RSS
        assert row["flops"] == attention_flops(row["batch"], row["seq_len"], row["heads"], row["head_dim"])
        assert re.search(rf"^\| {row['backend']} \| {row['seq_len']} \| ", quick_run["attention_md"], re.M)


def test_xformers_rows_are_skipped_on_cpu(quick_run):
    xformers = [r for r in quick_run["attention"]["rows"] if r["backend"] == "xformers"]
    xformers += [r for r in quick_run["peer"]["rows"] if "xformers" in r["name"]]
    assert len(xformers) == len(AttentionConfig.quick().seq_lens) + 1
    for row in xformers:
        assert row["status"].startswith("skipped: ") and "CUDA" in row["status"], row
    assert "skipped: " in quick_run["attention_md"] and "skipped: " in quick_run["peer_md"]


def test_peer_rows(quick_run):
    result = quick_run["peer"]
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == [v.name for v in VARIANTS]
    assert result["parameters"]["unizoo"] > 0 and result["parameters"]["diffusers"] > 0
    # Plain PyTorch everywhere; only compile (needs a toolchain) and xformers may skip.
    for name in ("diffusers fp32", "diffusers bf16", "unizoo fp32", "unizoo bf16",
                 "unizoo fused-adamw", "unizoo checkpointing"):
        assert rows[name]["status"] == "ok", rows[name]
    for name, row in rows.items():
        assert re.search(rf"^\| {re.escape(name)} \| ", quick_run["peer_md"], re.M), name
        if row["status"] != "ok":  # a switch this machine cannot run says why
            assert re.fullmatch(r"skipped: .+", row["status"]), row
            continue
        _positive_finite(row, ["params", "step_ms", "images_per_s", "flops_per_step", "tflops_per_s", "mfu",
                               "vs_diffusers_fp32", "vs_diffusers_bf16", "first_step_s"])
        assert math.isfinite(row["peak_mem_mb"]) and row["peak_mem_mb"] >= 0
        assert all(math.isfinite(loss) and loss > 0 for loss in row["losses"])
        assert len(row["losses"]) == result["config"]["steps"]
    assert rows["diffusers fp32"]["vs_diffusers_fp32"] == pytest.approx(1.0)
    # The printed table is the same Markdown.
    assert "| unizoo fp32 |" in quick_run["stdout"] and "| math | 64 |" in quick_run["stdout"]
    assert "peer unizoo fp32" in quick_run["stderr"]  # one progress line per measurement


def test_loss_checks(quick_run):
    result = quick_run["peer"]
    ok = [r for r in result["rows"] if r["status"] == "ok" and r["name"] not in REFERENCE.values()]
    checks = {c["variant"]: c for c in result["loss_checks"]}
    assert set(checks) == {r["name"] for r in ok}
    for row in ok:
        check = checks[row["name"]]
        assert check["tolerance_rel"] == {"fp32": 1e-3, "bf16": 5e-2}[row["precision"]]
        assert math.isfinite(check["max_rel_diff"]) and isinstance(check["passed"], bool)
        if row["precision"] == "fp32":  # compile / fused AdamW / checkpointing change no precision
            assert check["passed"], check
    assert "tolerance (fp32 1e-03, bf16 5%)" in quick_run["peer_md"]


def test_flop_count_of_a_matmul_only_module_is_exact():
    batch, d_in, d_hidden, d_out = 16, 64, 128, 32
    module = nn.Sequential(nn.Linear(d_in, d_hidden, bias=False), nn.Linear(d_hidden, d_out, bias=False))
    x = torch.randn(batch, d_in, requires_grad=True)
    forward = 2 * batch * d_in * d_hidden + 2 * batch * d_hidden * d_out
    assert count_flops(lambda: module(x)) == forward
    # backward: a gradient for the input and one for the weight of each matmul -> 2x forward
    assert count_flops(lambda: module(x).sum().backward()) == 3 * forward


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_attention_flops_are_the_same_model_count_for_every_kernel(backend):
    B, L, H, K = 2, 32, 3, 16
    q, k, v = (torch.randn(B, L, H, K, requires_grad=True) for _ in range(3))
    counted = count_flops(lambda: attention(q, k, v, backend=backend).sum().backward())
    assert counted == attention_flops(B, L, H, K) == 12 * B * H * L * L * K


def test_timing_and_memory_helpers():
    calls = []
    timing = time_call(lambda: calls.append(1), torch.device("cpu"), warmup=2, repeats=3)
    assert len(calls) == 5 and len(timing.times_s) == 3 and timing.median_s >= 0
    with PeakMemory(torch.device("cpu")) as memory:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    assert memory.bytes >= 0
    if "VmHWM" in memory_method(torch.device("cpu")):  # the reset high-water mark saw the block
        assert memory.bytes >= 32 * 2**20  # loose: RSS is page-granular, the allocator may reuse pages


@pytest.mark.cuda
@pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA device")
def test_quick_run_on_cuda(tmp_path):
    process = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "all", "--quick", "--device", "cuda", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    (folder,) = tmp_path.iterdir()
    assert folder.name.startswith("cuda-")
    peer = json.loads((folder / "peer_dit-quick.json").read_text())
    attention_rows = json.loads((folder / "attention-quick.json").read_text())["rows"]
    for row in attention_rows + peer["rows"]:
        assert row["status"] == "ok" or row["status"].startswith("skipped: "), row
    assert all(r["status"] == "ok" for r in attention_rows if r["backend"] != "xformers")
