"""The benchmark harness (benchmarks/, not installed): runs end to end and reports sanely.

A test of the harness, not of the numbers: ``--quick`` shrinks every size, and no
assertion depends on how fast anything ran.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a top-level package of the repository, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks.attention_backends import AttentionConfig, attention_flops  # noqa: E402
from benchmarks.clip_fidelity import markdown as clip_fidelity_markdown, merged  # noqa: E402
from benchmarks.convergence import main as convergence_main  # noqa: E402
from benchmarks.convergence import score_at, steps_to_reach  # noqa: E402
import benchmarks.measure as measure  # noqa: E402
from benchmarks.measure import OperatorCount, PeakMemory, count_flops, memory_method, time_call  # noqa: E402
from benchmarks.peer_dit import REFERENCE, VARIANTS, Variant, measure_variant, switch_variants  # noqa: E402
from benchmarks.peer_models import PeerConfig  # noqa: E402
from benchmarks.peer_pixart import DEFAULT_CONDITION_DIM  # noqa: E402
from benchmarks.peer_suite import ScalingConfig  # noqa: E402
from benchmarks.peer_why import COMPILED_GRAPH, kernel_profiling, op_name, self_time_by_op, top_difference  # noqa: E402
import benchmarks.report as report  # noqa: E402
from benchmarks.report import machine_slug  # noqa: E402
from benchmarks import step_parts  # noqa: E402
from benchmarks.row_guard import RowLimits, RowTooSlow, StepClock, estimated_step_bytes, precheck  # noqa: E402
from benchmarks.variants import VariantsConfig, run_variants, variants_markdown  # noqa: E402
from unizoo.components.backbones.causal_lm import LM_SIZES  # noqa: E402
from unizoo.components.conditioning.queries import QueryConditioning  # noqa: E402
from unizoo.components.generators.attention import attention  # noqa: E402
from unizoo.config.composition import compose_recipe  # noqa: E402
from unizoo.studies.study import DESIGN_SPACE, load_study  # noqa: E402
from unizoo.training.build import build_model  # noqa: E402

ON_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``python -m benchmarks.run all --quick`` from the repository root, into a tmp dir."""
    out = tmp_path_factory.mktemp("bench")
    # One thread each: two OpenMP threads next to another busy process wait on each other (the
    # variants grid alone once took over 4 minutes). Two processes, each with its own time limit, run
    # side by side on the CI machine's two cores: everything but the conditioned peers, and those.
    # bf16 is asked for: a CPU without bf16 instructions leaves it out by default (tested apart), and
    # the harness's bf16 paths are checked on every CPU (at these sizes emulated bf16 costs seconds).
    every_precision = ["--attn-precision", "fp32", "bf16", "--emulated-bf16"]
    commands = {
        "all": (["all", "--peer-parts", "dit"], 300),
        "conditioned peers": (["peer", "--peer-parts", "pixart", "scaling"], 600),  # ~60 s of CPU; slack for a busy machine
    }
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-m", "benchmarks.run", *arguments, *every_precision, "--quick", "--device", "cpu", "--threads", "1",
             "--out", str(out)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for name, (arguments, _) in commands.items()
    }
    outputs = {}
    try:
        for name, process in processes.items():
            outputs[name] = process.communicate(timeout=commands[name][1])
    finally:
        for process in processes.values():
            process.kill()  # a no-op for a process that has ended; stops the other when one timed out
    for name, process in processes.items():
        assert process.returncode == 0, (name, outputs[name][1][-3000:])
    stdout, stderr = outputs["all"]
    folders = list(out.iterdir())
    assert len(folders) == 1, folders
    folder = folders[0]
    assert (folder / "variants-quick.json").is_file() and (folder / "variants-quick.md").is_file()  # `all` runs it
    assert (folder / "cached_targets-quick.json").is_file() and (folder / "cached_targets-quick.md").is_file()  # and this
    return {
        "folder": folder,
        "stdout": stdout,
        "stderr": stderr,
        "attention": json.loads((folder / "attention-quick.json").read_text()),
        "loop": json.loads((folder / "loop-quick.json").read_text()),
        "peer": json.loads((folder / "peer_dit-quick.json").read_text()),
        "pixart": json.loads((folder / "peer_pixart-quick.json").read_text()),
        "scaling": json.loads((folder / "peer_scaling-quick.json").read_text()),
        "attention_md": (folder / "attention-quick.md").read_text(),
        "peer_md": (folder / "peer_dit-quick.md").read_text(),
        "pixart_md": (folder / "peer_pixart-quick.md").read_text(),
        "scaling_md": (folder / "peer_scaling-quick.md").read_text(),
    }


def _positive_finite(row: dict, keys) -> None:
    for key in keys:
        value = row[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (row.get("name"), key, value)


def test_an_avx2_cpu_gets_its_own_folder_and_avx512_folders_keep_their_names(monkeypatch):
    # "AMD EPYC" names both an AVX-512 + bf16 Zen 4 and an AVX2-only Zen 3: their numbers
    # must not land in one folder.
    monkeypatch.setattr(report, "cpu_model_name", lambda: "AMD EPYC")
    monkeypatch.setattr(report, "cpu_cores", lambda: 2)
    for capability, slug in [("AVX512", "cpu-amd-epyc-2c"), ("AVX512_BF16", "cpu-amd-epyc-2c"),
                             ("AVX2", "cpu-amd-epyc-avx2-2c"), ("DEFAULT", "cpu-amd-epyc-default-2c")]:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert machine_slug(torch.device("cpu")) == slug


def test_an_emulated_bf16_peak_is_measured_small_and_says_so(monkeypatch):
    sizes = {}

    def fake_rate(device, dtype, n, warmup, repeats):
        sizes[dtype] = n
        return 1e9

    monkeypatch.setattr(measure, "matmul_rate", fake_rate)
    monkeypatch.setattr(measure, "cpu_computes_bf16", lambda: False)
    peaks = measure.measured_peaks(torch.device("cpu"), 4096, repeats=1)
    assert sizes == {torch.float32: 4096, torch.bfloat16: measure.EMULATED_BF16_N}
    assert peaks["bf16"]["matmul_n"] == measure.EMULATED_BF16_N and "emulated" in peaks["bf16"]["note"]
    assert peaks["fp32"]["matmul_n"] == 4096 and "emulated" not in peaks["fp32"]["note"]
    monkeypatch.setattr(measure, "cpu_computes_bf16", lambda: True)
    peaks = measure.measured_peaks(torch.device("cpu"), 4096, repeats=1)
    assert peaks["bf16"]["matmul_n"] == 4096 and "emulated" not in peaks["bf16"]["note"]


def test_the_attention_benchmark_leaves_out_emulated_bf16_unless_asked(monkeypatch):
    import benchmarks.run as run  # noqa: PLC0415

    def precisions(argv):
        return run._configs(run.build_parser().parse_args(["attention", *argv]), torch.device("cpu"))[0].precisions

    monkeypatch.setattr(measure, "cpu_computes_bf16", lambda: False)
    assert precisions([]) == ("fp32",)
    assert "no bf16 instructions" in run.default_attention_precisions(torch.device("cpu"))[1]
    assert precisions(["--attn-precision", "bf16"]) == ("bf16",)  # asked for: measured, however slow
    monkeypatch.setattr(measure, "cpu_computes_bf16", lambda: True)
    assert precisions([]) == ("fp32", "bf16")
    assert run.default_attention_precisions(torch.device("cuda"))[0] == ("bf16",)


def test_the_peer_benchmark_skips_emulated_bf16_rows_unless_asked(monkeypatch):
    import benchmarks.peer_dit as peer_dit  # noqa: PLC0415
    import benchmarks.run as run  # noqa: PLC0415

    cpu = torch.device("cpu")
    peer_cfg = run._configs(run.build_parser().parse_args(["peer"]), cpu)[1]
    asked_cfg = run._configs(run.build_parser().parse_args(["peer", "--emulated-bf16"]), cpu)[1]
    bf16, fp32 = Variant("unizoo bf16", "unizoo", "bf16"), Variant("unizoo fp32", "unizoo")
    monkeypatch.setattr(measure, "cpu_computes_bf16", lambda: False)
    assert "bf16 is emulated on this CPU" in peer_dit._skip_reason(bf16, peer_cfg, cpu)
    assert peer_dit._skip_reason(fp32, peer_cfg, cpu) is None
    assert peer_dit._skip_reason(bf16, asked_cfg, cpu) is None  # asked for: measured, however slow
    rows = peer_dit.measure_together((bf16,), peer_cfg, cpu, {"unizoo": {}}, list(range(2)),
                                     flops={"unizoo": 1}, params={"unizoo": 1}, peaks={})
    assert rows[0]["status"].startswith("skipped: bf16 is emulated")  # skipped before any model is built
    monkeypatch.setattr(measure, "cpu_computes_bf16", lambda: True)
    assert peer_dit._skip_reason(bf16, peer_cfg, cpu) is None
    assert peer_dit._skip_reason(bf16, peer_cfg, torch.device("cuda")) is None


def test_results_say_whether_the_tree_had_uncommitted_changes(tmp_path, monkeypatch):
    def git(*arguments):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *arguments], cwd=tmp_path, check=True,
                       capture_output=True)

    monkeypatch.chdir(tmp_path)
    assert report.git_state() == (None, None)  # not a checkout
    git("init", "-q")
    (tmp_path / "code.py").write_text("a = 1\n")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "loop.md").write_text("old\n")
    git("add", ".")
    git("commit", "-q", "-m", "first")
    commit, dirty = report.git_state()
    assert re.fullmatch(r"[0-9a-f]{7,}", commit) and dirty is False
    (tmp_path / "benchmarks" / "results" / "loop.md").write_text("a result written by an earlier run\n")
    (tmp_path / "notes.txt").write_text("untracked\n")
    assert report.git_state() == (commit, False)  # neither results nor untracked files count
    (tmp_path / "code.py").write_text("a = 2\n")
    assert report.git_state() == (commit, True)
    env = {**report.environment(torch.device("cpu"), command="x"), "memory_method": "m"}
    assert env["git_commit"] == commit and env["git_dirty"] is True
    assert report.commit_label(env) == f"commit {commit} + uncommitted changes"
    assert report.commit_label({**env, "git_dirty": False}) == f"commit {commit}"


def test_the_loop_benchmark_times_both_steps_and_its_log_reads_like_a_run_s(quick_run):
    (row,) = quick_run["loop"]["rows"]
    assert row["recipe"] == "default" and row["device"] == "cpu"
    assert row["generator_compiled"] is False  # `compile: auto` on the CPU, as the stage's trainer runs it
    config = quick_run["loop"]["config"]
    assert len(row["bare_alone_times_ms"]) == config["bare_steps"]  # beside the one-image step, before the whole loop
    assert row["bare_step_ms"] > 0 and row["whole_step_ms"] > 0 and row["loader_ms"] > 0 and row["ema_update_ms"] > 0
    # The whole steps in blocks, each held to the bare steps timed on its two sides in the same fit.
    blocks = row["blocks"]
    assert len(blocks) == config["blocks"] and sum(b["steps"] for b in blocks) == row["whole_steps_timed"] == config["steps"]
    assert len(row["bare_times_ms"]) == len(blocks) + 1  # one bare step a side here (--quick): before, between, after
    for number, block in enumerate(blocks):
        beside = row["bare_times_ms"][number: number + 2]
        assert block["bare_step_ms"] == pytest.approx(sum(beside) / 2)
        assert block["overhead"] == pytest.approx(block["whole_step_ms"] / block["bare_step_ms"] - 1)
    assert row["whole_step_ms"] == pytest.approx(sum(b["whole_step_ms"] * b["steps"] for b in blocks) / config["steps"])
    assert row["overhead"] == pytest.approx(row["whole_step_ms"] / row["bare_step_ms"] - 1)
    assert row["overhead_low"] == min(b["overhead"] for b in blocks) and row["overhead_high"] == max(b["overhead"] for b in blocks)
    assert row["whole_images_per_s"] == pytest.approx(row["batch"] * 1e3 / row["whole_step_ms"])
    # What the host pays per step: the one-image step is timed as often as the batch's, and bounds its images/s.
    assert len(row["one_image_times_ms"]) == config["bare_steps"] and row["one_image_step_ms"] > 0
    assert row["eager_ceiling_images_per_s"] == pytest.approx(row["batch"] * 1e3 / row["one_image_step_ms"])
    assert row["operators_per_step"] > 100 and row["views_per_step"] > 0  # a DiT, an LM and a VAE encoder, forward and back
    # Where the step's time goes, part by part, on one image and on the batch: the parts of the generation
    # loss run apart, their operators adding up to the bare step's and a little more (their own seed gradients).
    parts = {p["part"]: p for p in row["step_parts"]}
    assert list(parts) == [step_parts.ENCODE, step_parts.TOKENIZE, step_parts.CONDITIONING, step_parts.GENERATOR,
                           step_parts.OPTIMISER]
    assert parts[step_parts.TOKENIZE]["operators"] == 0  # host work alone: it launches nothing
    assert all(p["operators"] > 0 for name, p in parts.items() if name != step_parts.TOKENIZE)
    assert row["operators_per_step"] <= sum(p["operators"] for p in parts.values()) <= 1.2 * row["operators_per_step"]
    assert all(p["one_image_ms"] > 0 and p["batch_ms"] > 0 for p in parts.values())
    assert "| sum of the parts |" in (quick_run["folder"] / "loop-quick.md").read_text()
    # The whole step's items carry their indices, as in `unizoo train`: the memo kept each item its steps drew.
    assert row["memo_items_kept"] == (config["warmup"] + config["steps"]) * row["batch"] and row["memo_items_read"] == 0
    # What `unizoo train` filters, the benchmark's log does not carry either.
    for chatter in ("Tip", "litlogger", "LeafSpec", "in eval mode"):
        assert chatter not in quick_run["stderr"], chatter


def test_the_operator_count_counts_kernels_and_views_apart():
    a, b = torch.randn(4, 3, requires_grad=True), torch.randn(3, 5)
    forward = OperatorCount()
    with forward:
        product = torch.mm(a, b).t()  # one matrix product, one transpose: a new header on the same storage
    assert (forward.operators, forward.views) == (1, 1)
    backward = OperatorCount()
    with backward:
        product.sum().backward()  # the sum, the seed gradient, and the product's own backward (a matrix product)
    assert backward.operators >= 3 and backward.views >= 1
    assert a.grad is not None  # counting changes nothing: the step still runs


def test_results_land_in_a_machine_folder(quick_run):
    folder = quick_run["folder"]
    assert folder.name == machine_slug(torch.device("cpu"))
    header = (folder / "attention-quick.md").read_text().splitlines()[0]
    assert re.search(r"\| commit ([0-9a-f]{7,}|unknown)( \+ uncommitted changes)? \|", header), header
    assert re.fullmatch(r"cpu-[a-z0-9-]+-\d+c", folder.name)
    for result in (quick_run["attention"], quick_run["peer"]):
        assert result["quick"] is True
        assert result["environment"]["machine"] == folder.name
        for peak in result["peaks"].values():
            assert peak["flops_per_s"] is None or (math.isfinite(peak["flops_per_s"]) and peak["flops_per_s"] > 0)
        assert result["peaks"]["fp32"]["flops_per_s"] > 0


def test_attention_rows(quick_run):
    result = quick_run["attention"]
    expected = {(b, n, p) for b in ("math", "sdpa", "gemm", "xformers") for n in AttentionConfig.quick().seq_lens
                for p in ("fp32", "bf16")}  # both precisions, as asked
    assert {(r["backend"], r["seq_len"], r["precision"]) for r in result["rows"]} == expected
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
    assert len(xformers) == 2 * len(AttentionConfig.quick().seq_lens) + 1
    for row in xformers:
        assert row["status"].startswith("skipped: ") and "CUDA" in row["status"], row
    assert "skipped: " in quick_run["attention_md"] and "skipped: " in quick_run["peer_md"]


def test_peer_rows(quick_run):
    result = quick_run["peer"]
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == [v.name for v in VARIANTS]
    assert result["parameters"]["unizoo"] > 0 and result["parameters"]["diffusers"] > 0
    # Plain PyTorch everywhere; only compile (needs a toolchain) and xformers may skip.
    for name in ("diffusers fp32", "diffusers bf16", "diffusers fused-adamw", "unizoo fp32", "unizoo bf16",
                 "unizoo fused-adamw", "unizoo checkpointing"):
        assert rows[name]["status"] == "ok", rows[name]
    for name, row in rows.items():
        assert re.search(rf"^\| {re.escape(name)} \| ", quick_run["peer_md"], re.M), name
        if row["status"] != "ok":  # a switch this machine cannot run says why
            assert re.fullmatch(r"skipped: .+", row["status"]), row
            continue
        _positive_finite(row, ["params", "step_ms", "images_per_s", "flops_per_step", "tflops_per_s", "mfu",
                               "vs_peer_fp32", "vs_peer_bf16", "first_step_s"])
        assert math.isfinite(row["peak_mem_mb"]) and row["peak_mem_mb"] >= 0
        assert all(math.isfinite(loss) and loss > 0 for loss in row["losses"])
        assert len(row["losses"]) == result["config"]["steps"]
    assert rows["diffusers fp32"]["vs_peer_fp32"] == pytest.approx(1.0)
    assert rows["unizoo fused-adamw"]["vs_peer_same"] == pytest.approx(
        rows["unizoo fused-adamw"]["images_per_s"] / rows["diffusers fused-adamw"]["images_per_s"])
    assert rows["unizoo checkpointing"]["vs_peer_same"] is None  # the peer has no such row
    # The printed table is the same Markdown.
    assert "| unizoo fp32 |" in quick_run["stdout"] and "| math | 64 |" in quick_run["stdout"]
    assert "peer unizoo fp32" in quick_run["stderr"]  # one progress line per measurement


def _sections(quick_run) -> list[dict]:
    """Every comparison of the quick run: DiT, PixArt at each Q, each scaling point."""
    return [quick_run["peer"], *quick_run["pixart"]["sections"], *(p["section"] for p in quick_run["scaling"]["points"])]


def test_loss_checks(quick_run):
    for result in _sections(quick_run):
        ok = [r for r in result["rows"] if r["status"] == "ok" and r["name"] not in REFERENCE.values()]
        checks = {c["variant"]: c for c in result["loss_checks"]}
        assert set(checks) == {r["name"] for r in ok}
        for row in ok:
            check = checks[row["name"]]
            assert check["tolerance_rel"] == {"fp32": 1e-3, "bf16": 5e-2}[row["precision"]]
            assert math.isfinite(check["max_rel_diff"]) and isinstance(check["passed"], bool)
            assert check["passed"], check  # fp32 switches change no precision; bf16 stays within 5% at quick size
    for md in ("peer_md", "pixart_md"):
        assert "tolerance (fp32 1e-03, bf16 5%)" in quick_run[md]


def test_every_family_gets_the_same_switches(quick_run):
    for result in [quick_run["peer"], *quick_run["pixart"]["sections"]]:
        peer = result["peer"]
        rows = {r["name"]: r for r in result["rows"]}
        for suffix in ("fp32", "bf16", "compile", "fused-adamw", "bf16+compile+fused"):
            for family in ("unizoo", peer):
                row = rows[f"{family} {suffix}"]
                assert row["status"] == "ok" or row["status"].startswith("skipped: "), row
        for name in (f"{peer} fp32", f"{peer} bf16", f"{peer} fused-adamw"):
            assert rows[name]["status"] == "ok", rows[name]


def test_best_vs_best_is_computed_from_the_rows(quick_run):
    for result, md in [(quick_run["peer"], quick_run["peer_md"]),
                       *((s, quick_run["pixart_md"]) for s in quick_run["pixart"]["sections"])]:
        peer, best = result["peer"], result["best_vs_best"]
        passed = {c["variant"] for c in result["loss_checks"] if c["passed"]} | set(REFERENCE.values())
        for family, side in (("unizoo", best["unizoo"]), (peer, best["peer"])):
            trusted = [r for r in result["rows"] if r["model"] == family and r["status"] == "ok" and r["name"] in passed]
            top = max(trusted, key=lambda r: r["images_per_s"])
            assert side["variant"] == top["name"] and side["images_per_s"] == top["images_per_s"]
        assert best["ratio"] == best["unizoo"]["images_per_s"] / best["peer"]["images_per_s"]
        rows = {r["name"]: r for r in result["rows"]}
        assert best["fp32_ratio"] == rows["unizoo fp32"]["images_per_s"] / rows[f"{peer} fp32"]["images_per_s"]
        assert f"**{best['ratio']:.3f}x**; plain fp32: **{best['fp32_ratio']:.3f}x**" in md
        assert (best["why"] is not None) == (best["ratio"] < 1)
        if best["ratio"] < 1:  # profiled first, within any limit
            assert " ms self time " in best["why"] or best["why"].startswith("no op slower"), best
        profiled = [p for p in result["profiles"] if "op" in p]
        slower = [r for r in result["rows"] if (r.get("vs_peer_same") or 1) < 1]
        assert len(profiled) == min(1, len(slower) + (best["ratio"] < 1)), result["profiles"]


def test_pixart_comparison_at_16_and_64_condition_tokens(quick_run):
    sections = quick_run["pixart"]["sections"]
    assert [s["config"]["condition_tokens"] for s in sections] == [16, 64]
    for section in sections:
        assert section["peer"] == "pixart" and section["config"]["condition_dim"] == DEFAULT_CONDITION_DIM
        flops = section["flops_per_step"]
        # Same depth, width, heads, patch and Q: the same work up to the stated architecture differences.
        assert flops["unizoo"] == pytest.approx(flops["pixart"], rel=0.05)
        assert section["config"]["label"] in quick_run["pixart_md"]
    assert sections[1]["flops_per_step"]["unizoo"] > sections[0]["flops_per_step"]["unizoo"]  # Q costs work
    assert "| pixart bf16+compile+fused |" in quick_run["pixart_md"]
    assert "x pixart, same switches" in quick_run["pixart_md"] and "why (top op by self time" in quick_run["pixart_md"]


def test_condition_width_is_the_default_backbones():
    recipe = compose_recipe("default", [])
    assert DEFAULT_CONDITION_DIM == LM_SIZES[recipe.backbone.size]["hidden_size"]


def test_why_names_an_op_exactly_where_unizoo_is_slower(quick_run):
    for result in _sections(quick_run):
        for row in result["rows"]:
            same = row.get("vs_peer_same")
            if row["model"] == "unizoo" and same is not None and same < 1:
                # quick runs profile one pair a comparison (PeerConfig.quick().max_profiles), the slowest
                assert re.fullmatch(r"\S+.* \+\d+\.\d ms self time \(unizoo .*\)|not profiled: over the limit .*|no op slower .*",
                                    row["why"]), row
            elif row["model"] != "unizoo" or same is not None:
                assert row["why"] is None, row


def test_scaling_points_and_table(quick_run):
    scaling, md = quick_run["scaling"], quick_run["scaling_md"]
    quick = ScalingConfig.quick()
    assert [(p["size"], p["tokens"]) for p in scaling["points"]] == [(s, n) for s in quick.sizes for n in quick.tokens]
    for point in scaling["points"]:
        section = point["section"]
        assert section["config"]["condition_tokens"] == quick.condition_tokens
        assert (section["config"]["latent_size"] // section["config"]["patch"]) ** 2 == point["tokens"]
        assert [r["name"] for r in section["rows"]] == ["pixart fp32", "pixart bf16", "unizoo fp32", "unizoo bf16"]
        for row in section["rows"]:
            assert row["status"] == "ok", row
            _positive_finite(row, ["images_per_s", "mfu"])
        best = section["best_vs_best"]
        assert re.search(rf"^\| {point['size']} \| {point['tokens']} \| .*\| {best['ratio']:.2f} \|", md, re.M)
    by_point = {(p["size"], p["tokens"]): p["section"]["flops_per_step"]["unizoo"] for p in scaling["points"]}
    assert by_point["S", 16] > by_point["S", 4] and by_point["B", 16] > by_point["S", 16]


def test_row_guard_says_why_a_row_cannot_run():
    cfg = PeerConfig.quick()
    needed = estimated_step_bytes(cfg, params=1000)
    assert needed == 16 * 1000 + cfg.depth * 16 * 2 * 32 * (34 + 5 * 2 * 16 / 32) * 2
    limits = RowLimits(time_limit_s=10)
    assert precheck(cfg, 1000, flops=1, steps=4, peak_flops_per_s=1e9, limits=limits, free_bytes=10 * needed) is None
    assert precheck(cfg, 1000, 1, 4, 1e9, limits, free_bytes=needed).startswith("skipped: memory: needs about")
    assert precheck(cfg, 1000, flops=10**10, steps=4, peak_flops_per_s=1e9, limits=limits,
                    free_bytes=10 * needed).startswith("skipped: time: 4 steps take at least 40 s")
    # A bf16 row keeps its activations at 16 bits (the formula's own unit); fp32 twice that.
    bf16 = estimated_step_bytes(cfg, params=1000, precision="bf16")
    assert bf16 == 16 * 1000 + cfg.depth * 16 * 2 * 32 * (34 + 5 * 2 * 16 / 32)
    # On CUDA the fused attention keeps no scores, and the limit is the GPU's free memory, not the host's.
    on_gpu = estimated_step_bytes(cfg, params=1000, precision="bf16", scores_kept=False)
    assert on_gpu == 16 * 1000 + cfg.depth * 16 * 2 * 32 * 34
    cuda = torch.device("cuda", 0)  # only named: free_bytes is given, so nothing asks the device
    assert precheck(cfg, 1000, 1, 4, 1e9, limits, free_bytes=int(on_gpu / 0.79), precision="bf16", device=cuda) is None
    assert precheck(cfg, 1000, 1, 4, 1e9, limits, free_bytes=on_gpu, precision="bf16", device=cuda) == (
        f"skipped: memory: needs about {on_gpu / 2**30:.1f} GiB (estimate, bf16), 80% of the "
        f"{on_gpu / 2**30:.1f} GiB free on the GPU is the limit")
    clock = StepClock(RowLimits(time_limit_s=1.0), steps=3)
    clock.check(0.6)  # only the row's own step seconds count
    with pytest.raises(RowTooSlow, match="stopped: time: 2 of 3 steps took 1 s"):
        clock.check(0.6)


def _row(name: str, status: str = "ok", images_per_s: float = 1.0, losses=(2.0, 1.9)) -> dict:
    model, switches = name.split(" ", 1)
    return {"name": name, "model": model, "precision": "bf16" if switches.startswith("bf16") else "fp32",
            "status": status, "images_per_s": images_per_s, "mfu": 0.1, "losses": list(losses)}


def test_where_the_fp32_row_did_not_run_the_bf16_rows_are_checked_against_the_bf16_one():
    # DiT-XL/2 at batch 256 on one GPU: the fp32 step does not fit, the bf16 ones do.
    from benchmarks.peer_dit import best_vs_best, loss_checks  # noqa: PLC0415

    memory = "skipped: memory: needs about 154.0 GiB (estimate, fp32), 80% of the 139.0 GiB free on the GPU is the limit"
    rows = [_row("diffusers fp32", memory), _row("diffusers compile", memory), _row("diffusers bf16", images_per_s=10),
            _row("diffusers bf16+compile+fused", images_per_s=14, losses=(2.01, 1.91)),
            _row("unizoo fp32", memory), _row("unizoo bf16", images_per_s=12),
            _row("unizoo bf16+compile+fused", images_per_s=30, losses=(2.5, 2.4))]  # off by a quarter: not trusted
    checks = {c["variant"]: c for c in loss_checks(rows)}
    assert {name: (c["reference"], c["passed"]) for name, c in checks.items()} == {
        "diffusers bf16+compile+fused": ("diffusers bf16", True), "unizoo bf16+compile+fused": ("unizoo bf16", False)}
    best = best_vs_best(rows, list(checks.values()), "diffusers")
    assert best["unizoo"]["variant"] == "unizoo bf16" and best["peer"]["variant"] == "diffusers bf16+compile+fused"
    assert best["ratio"] == 12 / 14 and best["fp32_ratio"] is None
    # Where the fp32 row ran, it is the reference, as before: the bf16 row is checked against it.
    rows[0] = _row("diffusers fp32", images_per_s=5)
    assert {c["variant"]: c["reference"] for c in loss_checks(rows) if c["variant"].startswith("diffusers")} == {
        "diffusers bf16": "diffusers fp32", "diffusers bf16+compile+fused": "diffusers fp32"}


def test_a_row_over_its_time_limit_stops_and_says_so():
    cfg = PeerConfig.quick()
    from benchmarks.peer_dit import _build  # noqa: PLC0415
    from benchmarks.peer_models import make_batches  # noqa: PLC0415

    variant = Variant("unizoo fp32", "unizoo")
    init = _build(variant, cfg).state_dict()
    peaks = {"fp32": {"flops_per_s": 1e12}}
    row = measure_variant(variant, cfg, torch.device("cpu"), init, make_batches(cfg, 3, torch.device("cpu")),
                          flops=1, params=1, peaks=peaks, limits=RowLimits(time_limit_s=1e-6))
    assert row["status"].startswith("stopped: time: 1 of 3 steps took"), row
    assert "images_per_s" not in row


def test_why_profiles_name_the_op_that_differs():
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    slow = self_time_by_op(lambda: [torch.mm(a, b) for _ in range(20)], torch.device("cpu"))
    fast = self_time_by_op(lambda: torch.add(a, b), torch.device("cpu"))
    difference = top_difference(slow, fast)
    assert difference["op"] == "aten::mm" and difference["peer_ms"] == 0 and difference["difference_ms"] > 0
    assert [v.name for v in switch_variants("pixart")] == [
        "pixart fp32", "pixart bf16", "pixart compile", "pixart fused-adamw", "pixart bf16+compile+fused"]


def test_compiled_kernels_are_named_alike_on_both_sides():
    assert op_name("graph_3_cpp_fused_add_mul_native_layer_norm_7") == "cpp_fused_add_mul_native_layer_norm"
    assert op_name("graph_0_cpp_fused_add_mul_native_layer_norm_2") == "cpp_fused_add_mul_native_layer_norm"
    assert op_name("## Call CompiledFxGraph fysw7vaish36uc6dc2 ##") == COMPILED_GRAPH
    assert op_name("aten::addmm") == "aten::addmm"


def test_a_step_compiled_under_kernel_profiling_shows_its_fused_kernels():
    torch._dynamo.reset()
    x = torch.randn(64, 64)

    def gelu_of_sum(t):
        return torch.nn.functional.gelu(t + 1.0) * 2.0

    compiled = torch.compile(gelu_of_sum)
    try:
        with kernel_profiling():
            compiled(x)
        times = self_time_by_op(lambda: compiled(x), torch.device("cpu"))
    finally:
        torch._dynamo.reset()
    kernels = [name for name in times if name.startswith("cpp_fused_")]
    assert kernels, sorted(times)
    assert not any(name.startswith("graph_") for name in times)


def test_bad_peer_sizes_are_usage_errors():
    from benchmarks.run import main  # noqa: PLC0415

    for argv in (["peer", "--scaling-sizes", "S", "huge"], ["peer", "--scaling-tokens", "100", "200"],
                 ["peer", "--condition-tokens", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--out", "/nonexistent"])
        assert exit_info.value.code == 2


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


# ---------------------------------------------------------------- design-space variants

def test_every_cell_builds_on_the_device_it_is_measured_on(monkeypatch):
    """The variants harness builds each model under `with device:`; "meta" stands in for a GPU here.

    Each model must come out of `build_model` already there (not built on the host, then moved), and nothing of
    any cell's build may insist on the host (it would mix devices, or leave a tensor behind).
    """
    import benchmarks.variants as variants_module

    built_on = []

    def recording(recipe):
        model = build_model(recipe)
        built_on.append({t.device.type for t in itertools.chain(model.parameters(), model.buffers())})
        return model

    monkeypatch.setattr(variants_module, "build_model", recording)
    study = load_study(DESIGN_SPACE)
    for cell in study.cells():
        recipe = compose_recipe(study.recipe, [*cell.overrides, *study.throughput, *variants_module.QUICK_OVERRIDES])
        stage = instantiate(recipe.strategy).stages[-1]
        variants_module._build(recipe, stage, torch.device("meta"), seed=0)
        assert built_on[-1] == {"meta"}, (cell.name, built_on[-1])
    assert len(built_on) == len(study.cells()) == 8


VARIANT_CELLS = ("vae+flow_matching+sequential", "clip+flow_matching+sequential")


@pytest.fixture(scope="module")
def variants_run(tmp_path_factory):
    """``benchmarks.run variants --quick`` on two cells (VAE and CLIP, flow matching, sequential)."""
    out = tmp_path_factory.mktemp("variants")
    # One thread: next to another busy process on the same cores, two OpenMP threads wait on
    # each other and a step takes 45-115x longer; one keeps the run in seconds.
    process = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "variants", "--quick", "--device", "cpu", "--threads", "1",
         "--select", "objective=flow_matching", "strategy=sequential", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    (folder,) = out.iterdir()
    return {
        "result": json.loads((folder / "variants-quick.json").read_text()),
        "md": (folder / "variants-quick.md").read_text(),
        "stdout": process.stdout,
        "stderr": process.stderr,
    }


def test_variants_rows(variants_run):
    result = variants_run["result"]
    assert result["quick"] is True and result["config"]["sizes"] == ["tiny"]
    rows = result["rows"]
    expected = {(cell, stage, "tiny") for cell in VARIANT_CELLS for stage in ("understanding", "generation")}
    assert sorted((r["name"], r["stage"], r["size"]) for r in rows) == sorted(expected)  # one row each
    for row in rows:
        assert row["status"] == "ok", row
        _positive_finite(row, ["step_ms", "images_per_s", "tokens_per_s", "flops_per_step", "tflops_per_s", "mfu"])
        assert math.isfinite(row["peak_mem_mb"]) and row["peak_mem_mb"] >= 0
        assert row["tokens_per_s"] == row["images_per_s"] * row["tokens_per_image"]  # exactly, as the JSON says
        assert row["images_per_s"] == pytest.approx(row["batch"] / (row["step_ms"] / 1e3))
        # The throughput setting: 64 px, 16x16x4 VAE latents against CLIP's 16x16 grid pooled to 64.
        assert row["tokens_per_image"] == {"vae": 256, "clip": 64}[row["representation"]]
        if row["stage"] == "generation":
            _positive_finite(row, ["target_encode_ms", "generator_ms", "generator_flops"])
            assert row["generator_flops"] < row["flops_per_step"]
        else:  # no generation loss: nothing to break down
            assert row["generator_ms"] is None and row["target_encode_ms"] is None
    by_key = {(r["representation"], r["stage"]): r for r in rows}
    # The understanding stage never touches the target: the same model FLOPs either way.
    assert by_key["vae", "understanding"]["flops_per_step"] == by_key["clip", "understanding"]["flops_per_step"]
    assert by_key["vae", "generation"]["flops_per_step"] > by_key["clip", "generation"]["flops_per_step"]
    assert "variants vae+flow_matching+sequential" in variants_run["stderr"]


def test_variants_markdown_and_clip_vae_ratio(variants_run):
    result, md = variants_run["result"], variants_run["md"]
    for row in result["rows"]:
        assert re.search(rf"^\| {re.escape(row['name'])} \| {row['stage']} \| tiny \| 4 \| ", md, re.M), row["name"]
    pairs = {p["stage"]: p for p in result["clip_vs_vae"]}
    assert set(pairs) == {"understanding", "generation"}
    rows = {(r["representation"], r["stage"]): r for r in result["rows"]}
    for stage, pair in pairs.items():
        assert pair["ratio"] == rows["clip", stage]["images_per_s"] / rows["vae", stage]["images_per_s"]
        assert pair["reaches_target"] == (pair["ratio"] >= 3)
        assert pair["why"]
    assert pairs["generation"]["generation_loss"] and not pairs["understanding"]["generation_loss"]
    assert "no generation loss" in pairs["understanding"]["why"]
    if not pairs["generation"]["reaches_target"]:  # the table says why, from the step's breakdown
        assert "generator" in pairs["generation"]["why"] and "% of the CLIP step" in pairs["generation"]["why"]
    line = re.search(r"^CLIP/VAE images/s, generator tiny: (.*)$", md, re.M)
    assert line, md
    ratio = pairs["generation"]["ratio"]
    verdict = "reaches" if ratio >= 3 else "below"
    assert f"flow_matching/sequential/generation {ratio:.2f}x ({verdict} 3x)" in line.group(1)
    assert "stages with a generation loss reach 3x" in line.group(1)
    assert "CLIP/VAE images/s, generator tiny:" in variants_run["stdout"]  # the printed table is the same Markdown


# ---------------------------------------------------------------- pre-extracted targets


@pytest.fixture(scope="module")
def targets_run(quick_run):
    """``benchmarks.run targets --quick``, as ``all --quick`` runs it: a training step encoding the target vs
    reading it from a cache (read from the quick run's folder rather than run a second time)."""
    folder = quick_run["folder"]
    return {"result": json.loads((folder / "cached_targets-quick.json").read_text()),
            "md": (folder / "cached_targets-quick.md").read_text(), "stderr": quick_run["stderr"]}


def test_cached_targets_rows(targets_run):
    result, md = targets_run["result"], targets_run["md"]
    assert result["quick"] is True and result["config"]["batch"] == 4
    rows = {r["representation"]: r for r in result["rows"]}
    assert set(rows) == {"vae", "clip"}
    for name, row in rows.items():
        assert row["status"] == "ok", row
        _positive_finite(row, ["on_the_fly_step_ms", "cached_step_ms", "on_the_fly_images_per_s", "cached_images_per_s",
                               "speedup", "extraction_images_per_s", "cache_bytes_per_item"])
        assert row["on_the_fly_load_ms"] >= 0 and row["cached_load_ms"] >= 0
        assert row["speedup"] == row["on_the_fly_step_ms"] / row["cached_step_ms"]
        assert row["cached_images_per_s"] == pytest.approx(4 / (row["cached_step_ms"] / 1e3))
        assert len(row["on_the_fly_times_ms"]) == len(row["cached_times_ms"]) == result["config"]["repeats"]
        assert row["cached_batches_had_targets"]  # the cached steps really read targets, the others did not
        assert (row["tokens"], row["channels"]) == {"vae": (64, 4), "clip": (64, 64)}[name]
        # float32 targets: at least 4 bytes a number, plus the index and a small header per shard
        assert 4 * row["tokens"] * row["channels"] <= row["cache_bytes_per_item"] < 4 * row["tokens"] * row["channels"] + 1000
        assert row["items"] == result["config"]["items"]
        assert re.search(rf"^\| {name} \| 4 \| {row['tokens']} x {row['channels']} \| ", md, re.M), name
        assert f"targets {name}" in targets_run["stderr"]


CHOICE_TARGETS = {"vae": ".VAERepresentation", "clip": ".CLIPRepresentation", "mse": ".MSERegression",
                  "flow_matching": ".FlowMatching", "joint": ".joint.joint", "sequential": ".sequential.sequential"}


def test_design_space_grid_composes_every_cell():
    study = load_study(DESIGN_SPACE)
    assert {group: list(choices) for group, choices in study.axes.items()} == {
        "representation": ["vae", "clip"], "objective": ["mse", "flow_matching"], "strategy": ["joint", "sequential"],
    }
    cells = study.cells()
    assert len(cells) == 8 and len({c.name for c in cells}) == 8
    for cell in cells:
        recipe = compose_recipe(study.recipe, [*cell.overrides, *study.throughput])
        for group, choice in cell.choices.items():
            assert recipe[group]._target_.endswith(CHOICE_TARGETS[choice]), (cell.name, group)
        tokens, _ = instantiate(recipe.representation).token_shape
        assert tokens == {"vae": 256, "clip": 64}[cell.choices["representation"]]
    assert [c.name for c in study.cells(study.parse_select(["representation=clip", "strategy=joint"]))] == [
        "clip+mse+joint", "clip+flow_matching+joint"]
    with pytest.raises(ValueError, match="choices of objective are mse, flow_matching"):
        study.parse_select(["objective=diffusion"])


def test_variants_rows_that_cannot_be_built_fail_alone():
    cfg = VariantsConfig.quick()
    peaks = {"fp32": {"flops_per_s": 1e9, "matmul_n": 256, "note": "made up: nothing is timed"}}
    bad_size = replace(cfg, sizes=("huge",), select=("representation=vae", "objective=mse", "strategy=sequential"))
    result = run_variants(bad_size, torch.device("cpu"), peaks, progress=lambda line: None)
    assert [(r["stage"], r["status"][:8]) for r in result["rows"]] == [("understanding", "failed: "),
                                                                     ("generation", "failed: ")]
    bad_key = replace(bad_size, sizes=("tiny",), extra_overrides=("generator.no_such_key=1",))
    (row,) = run_variants(bad_key, torch.device("cpu"), peaks, progress=lambda line: None)["rows"]
    assert row["stage"] is None and row["status"].startswith("failed: RecipeError") and "no_such_key" in row["status"]
    markdown = variants_markdown(result, peaks)
    assert "failed: " in markdown and "CLIP/VAE images/s, generator huge: no CLIP/VAE pair measured." in markdown


def test_variants_select_is_checked_before_measuring():
    from benchmarks.run import main  # noqa: PLC0415

    with pytest.raises(SystemExit) as exit_info:
        main(["variants", "--select", "objective=diffusion", "--out", "/nonexistent"])
    assert exit_info.value.code == 2


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


def test_clip_fidelity_table_runs_and_resumes(tmp_path):
    """The lever table end to end at tiny size: trains each variant in its own process, then reuses the runs."""
    command = [sys.executable, "-m", "benchmarks.clip_fidelity", "--quick", "--seeds", "0", "--variants", "vae", "clip_all",
               "blip3o_1500", "--prompts", "4", "--robustness-images", "4", "--guidance", "1", "6", "--runs", str(tmp_path / "runs"),
               "--out", str(tmp_path / "out")]
    first = subprocess.run([*command, "--jobs", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "training 3 runs, 2 at a time" in first.stderr  # then tabulated from the runs just trained
    assert all(f"] {name}_s0: reusing" in first.stderr for name in ("vae", "clip_all", "blip3o_1500"))
    (folder,) = (tmp_path / "out").iterdir()
    result = json.loads((folder / "clip_fidelity-quick.json").read_text())
    assert set(result["variants"]) == {"vae", "clip_all", "blip3o_1500"}
    # A sequential row: --quick gave each of its stages 3 steps; its LM is frozen in stage 2.
    (blip3o,) = result["variants"]["blip3o_1500"]
    assert blip3o["steps"] == 3 and blip3o["understanding"]["understanding"] == blip3o["understanding"]["generation"]
    assert "understanding" not in result["variants"]["vae"][0]
    for runs in result["variants"].values():
        assert 0.0 <= runs[0]["trained"]["overall"] <= 1.0 and 0.0 <= runs[0]["representation"]["random_features"] <= 1.0
    assert set(result["robustness"]) == {"channel, noise 0.5"}
    assert "| `clip_all` |" in (folder / "clip_fidelity-quick.md").read_text()
    # The sampler rows: both runs scored again at each guidance, their tokens compared with real ones.
    assert set(result["sampler"]) == {"vae", "clip_all"} and result["guidances"] == [1.0, 6.0]
    for (sweep,) in result["sampler"].values():
        assert set(sweep["scores"]) == {"1.0", "6.0"} and all(0.0 <= v <= 1.0 for v in sweep["scores"].values())
        assert sweep["features"]["1.0"]["std_ratio"] > 0 and "neighbour_ratio" in sweep["features"]["6.0"]
    assert "### Sampler" in (folder / "clip_fidelity-quick.md").read_text()
    # Where generation fails: the prompt's use per noise level and the recovery from each noise level.
    for (sweep,) in result["sampler"].values():
        assert set(sweep["condition_use"]["1.0"]) == {"true", "shuffled", "null"}
        assert set(sweep["recovery"]) == {"0.6", "0.8", "0.9", "1.0"} and all(0.0 <= v <= 1.0 for v in sweep["recovery"].values())
    assert "### Where generation fails" in (folder / "clip_fidelity-quick.md").read_text()
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0 and again.stderr.count("reusing") == 3, again.stderr[-2000:]


def test_condition_use_and_recovery_of_an_oracle_generator():
    """A generator that knows each caption's target exactly: zero error with its own caption, and it
    integrates back to the exact targets from any noise level."""
    from types import SimpleNamespace  # noqa: PLC0415

    from benchmarks.clip_fidelity import CONDITION_SIGMAS, RECOVERY_SIGMAS, condition_use, recovery  # noqa: PLC0415
    from unizoo.components.objectives.flow_matching import FlowMatching  # noqa: PLC0415

    targets = torch.randn(6, 4, 2, generator=torch.Generator().manual_seed(0))

    class Oracle(torch.nn.Module):
        """Outputs x0 of the item its condition names (an x0 prediction); the null condition (-1) gets zeros."""

        token_shape = (4, 2)

        def drop_condition(self, cond, drop):
            return torch.where(drop.view(-1, 1, 1), torch.full_like(cond, -1.0), cond)

        def forward(self, x, t, cond):
            item = cond[:, 0, 0].long()
            return torch.where((item >= 0).view(-1, 1, 1), targets[item.clamp_min(0)], torch.zeros_like(x))

    captions = [str(i) for i in range(6)]
    model = SimpleNamespace(
        objective=FlowMatching(prediction="x0", guidance=1.0, sample_steps=10), generator=Oracle(),
        backbone=SimpleNamespace(condition=lambda texts: torch.tensor([float(t) for t in texts]).view(-1, 1, 1)),
        conditioning=QueryConditioning(),  # the model's read of the backbone: its query condition
        representation=SimpleNamespace(decode=lambda tokens: tokens),
    )
    use = condition_use(model, targets, captions)
    for sigma in CONDITION_SIGMAS:
        assert use[str(sigma)]["true"] < 1e-10 and use[str(sigma)]["shuffled"] > 0.1
        # Null predicts x0 = 0, so the velocity error is (x0 / sigma)^2 on average.
        assert use[str(sigma)]["null"] == pytest.approx(float((targets / sigma).pow(2).mean()), rel=1e-4)

    def exact(texts, images):
        return {"overall": float(torch.allclose(images, targets, atol=1e-4))}

    assert recovery(model, exact, targets, captions, steps=None) == {str(s): 1.0 for s in RECOVERY_SIGMAS}


def test_feature_statistics_of_generated_tokens():
    from benchmarks.clip_fidelity import feature_statistics  # noqa: PLC0415

    real = torch.randn(16, 64, 8, generator=torch.Generator().manual_seed(0)) * 2 + 1
    same = feature_statistics(real, real)
    assert same == pytest.approx({"std_ratio": 1.0, "mean_gap": 0.0, "neighbour_ratio": 1.0})
    mean = real.mean(dim=(0, 1))
    halved = feature_statistics((real - mean) * 0.5 + mean, real)  # pulled halfway to each channel's mean
    assert halved["std_ratio"] == pytest.approx(0.5, rel=1e-4) and halved["neighbour_ratio"] == pytest.approx(0.25, rel=1e-4)
    assert halved["mean_gap"] == pytest.approx(0.0, abs=1e-5)
    shifted = feature_statistics(real + 2.0, real)  # two real stds off in every channel
    assert shifted["mean_gap"] == pytest.approx(1.0, rel=0.05)
    flat = feature_statistics(real.mean(1, keepdim=True).expand_as(real), real)  # one token repeated: no structure
    assert flat["neighbour_ratio"] == 0.0
    assert "neighbour_ratio" not in feature_statistics(real[:, :63], real[:, :63])  # not a square grid


def test_vae_pretraining_schedules_table(tmp_path):
    """Each schedule trains the recipe's VAE from the shipped init and data order; bad specs are usage errors."""
    from benchmarks import vae_pretraining  # noqa: PLC0415

    assert vae_pretraining.main(["--quick", "--seeds", "0", "1", "--out", str(tmp_path)]) == 0
    (folder,) = tmp_path.iterdir()
    result = json.loads((folder / "vae_pretraining-quick.json").read_text())
    assert [(r["steps"], r["batch"], r["precision"], r["seed"]) for r in result["rows"]] == [
        (3, 4, "32-true", 0), (3, 4, "32-true", 1), (3, 4, "bf16-mixed", 0), (3, 4, "bf16-mixed", 1)]
    for row in result["rows"]:
        assert row["seconds"] > 0 and math.isfinite(row["final_loss"]) and 0.0 <= row["round_trip_overall"] <= 1.5
    by_seed = [row["final_loss"] for row in result["rows"][:2]]
    assert by_seed[0] != by_seed[1]  # another initialisation, another VAE
    assert "| 3 x 4 | bf16-mixed | 1 |" in (folder / "vae_pretraining-quick.md").read_text()
    with pytest.raises(SystemExit):
        vae_pretraining.main(["--schedules", "850:32", "--out", str(tmp_path)])


def test_peer_and_unizoo_rows_of_the_same_switches_are_timed_in_alternation(monkeypatch):
    import benchmarks.peer_dit as peer_dit  # noqa: PLC0415

    variants = peer_dit.variants_for("pixart")
    groups = [[v.name for v in group] for group in peer_dit.pair_up(variants, "pixart")]
    assert groups == [
        ["pixart fp32", "unizoo fp32"], ["pixart bf16", "unizoo bf16"], ["pixart compile", "unizoo compile"],
        ["pixart fused-adamw", "unizoo fused-adamw"], ["pixart bf16+compile+fused", "unizoo bf16+compile+fused"],
        ["unizoo bf16 sdpa"], ["unizoo checkpointing"], ["unizoo xformers"]]
    assert sorted(name for group in groups for name in group) == sorted(v.name for v in variants)

    calls = []

    def fake_trainer(variant, cfg, init_state, device):
        def step(batch):
            calls.append((variant.model, batch))
            if variant.model == "unizoo" and batch == 4:
                raise RuntimeError("out of memory at step 4")
            return torch.tensor(1.0)
        return step

    monkeypatch.setattr(peer_dit, "trainer", fake_trainer)
    cfg = PeerConfig.quick()  # warmup 1
    pair = (Variant("pixart fp32", "pixart"), Variant("unizoo fp32", "unizoo"))
    rows = peer_dit.measure_together(pair, cfg, torch.device("cpu"), {"pixart": {}, "unizoo": {}}, list(range(6)),
                                     flops={"pixart": 1, "unizoo": 1}, params={"pixart": 1, "unizoo": 1}, peaks={})
    # Warm-up alone, each in turn; then alternation, the order flipping every step; a failed side drops out.
    assert calls == [("pixart", 0), ("unizoo", 0), ("unizoo", 1), ("pixart", 1), ("pixart", 2), ("unizoo", 2),
                     ("unizoo", 3), ("pixart", 3), ("pixart", 4), ("unizoo", 4), ("pixart", 5)]
    assert rows[0]["status"] == "ok" and len(rows[0]["times_ms"]) == 5 and len(rows[0]["losses"]) == 6
    assert rows[1]["status"] == "failed: RuntimeError: out of memory at step 4" and "images_per_s" not in rows[1]


def test_peer_comparisons_build_unizoo_with_the_peer_s_modulation(quick_run):
    """Same architecture where unizoo can match it: adaLN-Zero vs diffusers' DiT, adaLN-single vs PixArt."""
    assert quick_run["peer"]["config"]["adaln"] == "zero"
    conditioned = [*quick_run["pixart"]["sections"], *(p["section"] for p in quick_run["scaling"]["points"])]
    assert {section["config"]["adaln"] for section in conditioned} == {"single"}
    assert "both modulate with adaLN-single" in quick_run["pixart_md"]
    from benchmarks.peer_models import build_unizoo, recipe_adaln, recipe_default_note  # noqa: PLC0415
    from unizoo.config.composition import compose_recipe  # noqa: PLC0415

    # Where the table's unizoo is not the recipe's DiT, the table says which the recipe builds.
    assert recipe_adaln() == compose_recipe().generator.adaln
    other = next(mode for mode in ("zero", "single") if mode != recipe_adaln())
    assert f"builds adaln={recipe_adaln()} instead" in recipe_default_note(other)
    assert recipe_default_note(recipe_adaln()) == ""
    with torch.device("meta"):
        single = build_unizoo(replace(PeerConfig.quick(), adaln="single"))
    assert single.adaln == "single" and hasattr(single.blocks[0], "scale_shift_table")


def test_peer_adaln_flag_overrides_the_peer_s_modulation():
    from benchmarks.run import _configs, build_parser  # noqa: PLC0415

    args = build_parser().parse_args(["peer", "--quick", "--adaln", "zero"])
    assert _configs(args, torch.device("cpu"))[1].adaln == "zero"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["peer", "--adaln", "none"])


def test_latte_benchmark_times_equal_parameters_and_reads_a_study(tmp_path):
    from benchmarks.latte import main as latte_main

    study = tmp_path / "study"
    study.mkdir()
    (study / "study.yaml").write_text("recipe: default\naxes:\n  - group: generator\n    choices:\n      dit: []\n"
                                      "      latte_dit: [generator.groups=2]\nseeds: 2\n")
    (study / "results.csv").write_text(
        "variant,generator,seed,status,overall,strict_overall,images_per_s_generation,steps\n"
        "dit,dit,0,done,0.5,0.4,100,1500\ndit,dit,1,done,0.7,0.6,110,1500\nlatte_dit,latte_dit,0,done,0.4,0.3,150,1500\n"
    )
    assert latte_main(["--quick", "--groups", "2", "4", "--study", str(study), "--out", str(tmp_path), "--threads", "1"]) == 0
    folder = tmp_path / machine_slug(torch.device("cpu"))
    result = json.loads((folder / "latte-quick.json").read_text())
    rows = {row["name"]: row for row in result["speed"]}
    assert list(rows) == ["dit", "latte_dit G=2", "latte_dit G=4"]
    assert len({row["generator_params"] for row in rows.values()}) == 1  # equal parameters
    assert [row["blocks_per_step"] for row in rows.values()] == [4, 2, 1]
    assert result["scores"]["dit"]["overall"]["mean"] == pytest.approx(0.6) and result["scores"]["latte_dit"]["groups"] == 2
    md = (folder / "latte-quick.md").read_text()
    assert "| dit | 4 of 4 |" in md and "| 0.600 ± 0.141 |" in md and re.search(r"\| latte_dit G=2 \| 2 of 4 \| .* \| 0\.400 \| 0\.300 \| 1 \| 150\.0 \|", md)


def test_search_benchmark_scores_every_method_and_verifier(tmp_path):
    from benchmarks.search import main as search_main
    from conftest import STAGE_STEPS, TINY_OVERRIDES
    from unizoo.training.train import train

    run = train(compose_recipe("default", [*TINY_OVERRIDES, "strategy=joint", *STAGE_STEPS["joint"], f"run_root={tmp_path / 'runs'}"]))
    assert search_main([str(run), "--quick", "--out", str(tmp_path), "--threads", "1"]) == 0
    folder = tmp_path / machine_slug(torch.device("cpu"))
    result = json.loads((folder / "search-quick.json").read_text())
    keys = {(r["method"], r["verifier"], r["budget"]) for r in result["rows"]}
    assert keys == {(m, v, b) for m in ("random", "zero_order") for v in ("oracle", "agreement", "self") for b in (1, 2)} | {
        ("more steps", "–", 1), ("more steps", "–", 2)}
    for row in result["rows"]:
        assert row["nfe"] == 4 * row["budget"]  # 2 steps x [cond; uncond] per candidate, or 2 x budget steps
    budget_one = [r["overall"]["mean"] for r in result["rows"] if r["budget"] == 1]
    assert len(set(budget_one)) == 1  # budget 1 is plain sampling whatever the method and verifier
    assert (folder / "search-quick.png").stat().st_size > 10_000 and "| zero_order | self | 2 | 8 |" in (folder / "search-quick.md").read_text()
    # --jobs 2: the runs measured side by side in their own processes give the points one process gives.
    assert search_main([str(run), str(run), "--quick", "--out", str(tmp_path / "jobs"), "--threads", "2", "--jobs", "2"]) == 0
    side_by_side = json.loads((tmp_path / "jobs" / folder.name / "search-quick.json").read_text())["points"]
    assert len(side_by_side) == 2 * len(result["points"])
    for first, second, alone in zip(side_by_side[: len(result["points"])], side_by_side[len(result["points"]):], result["points"], strict=True):
        for point in (first, second):
            assert {k: point[k] for k in ("method", "verifier", "budget", "nfe")} == {k: alone[k] for k in ("method", "verifier", "budget", "nfe")}
            assert point["overall"] == alone["overall"]  # one thread in each: the same arithmetic


# ------------------------------------------------------------------ convergence (benchmarks/convergence.py)

def test_steps_to_reach_interpolates_and_counts_only_a_climb_from_below():
    curve = [(0, 0.18), (100, 0.05), (200, 0.15), (300, 0.35)]
    assert steps_to_reach(curve, 0.25) == pytest.approx(250.0)  # between 0.15 at 200 and 0.35 at 300
    assert steps_to_reach(curve, 0.1) == pytest.approx(150.0)  # the untrained 0.18 does not count: it fell below first
    assert steps_to_reach(curve, 0.5) is None
    assert steps_to_reach([(0, 0.3), (100, 0.4)], 0.2) == 0  # never below: reached at the start
    assert score_at(curve, 250) == pytest.approx(0.25)
    assert score_at(curve, 400) is None


def _fake_study(folder: Path, axes: str, cells: dict[str, list[list[tuple[int, float]]]], round_trips=None) -> None:
    """A study folder as `unizoo study` leaves it: study.yaml, and per variant its status and metrics."""
    folder.mkdir(parents=True)
    (folder / "study.yaml").write_text(axes)
    for cell, seeds in cells.items():
        for seed, curve in enumerate(seeds):
            variant = folder / "variants" / f"{cell}-seed{seed}"
            (variant / "run").mkdir(parents=True)
            (variant / "status.json").write_text(json.dumps({"state": "done"}))
            metrics = {"representation": {"ratio": 1.0, "round_trip": 0.9},
                       "curve": [{"steps": s, "generation": {"overall": v}} for s, v in curve]}
            if round_trips and cell in round_trips:
                metrics["representation_after"] = {"end_to_end": {"ratio": round_trips[cell]}}
            (variant / "run" / "metrics.json").write_text(json.dumps(metrics))


def test_convergence_tabulates_steps_speed_ups_and_round_trips(tmp_path):
    _fake_study(tmp_path / "repa", "axes:\n  - group: alignment\n    choices: {none: [], repa: []}\nseeds: 2\n", {
        "none": [[(0, 0.0), (100, 0.1), (200, 0.3)], [(0, 0.0), (100, 0.1), (200, 0.2)]],
        "repa": [[(0, 0.0), (100, 0.3), (200, 0.5)], [(0, 0.0), (100, 0.2), (200, 0.4)]],
    })
    _fake_study(tmp_path / "repa_e", "axes:\n  - group: strategy\n    choices: {repa_e: []}\nseeds: 1\n",
                {"repa_e": [[(0, 0.0), (200, 0.4)]]}, round_trips={"repa_e": 0.8})
    assert convergence_main([str(tmp_path / "repa"), str(tmp_path / "repa_e"), "--name", "t", "--thresholds", "0.2",
                             "--baseline", "alignment=none", "--at", "100", "--out", str(tmp_path / "out"), "--machine", "m"]) == 0
    table = (tmp_path / "out" / "m" / "t.md").read_text()
    # none reaches 0.2 at 150 and 200 steps, repa at 67 and 100: 175 / 83.3 = 2.10x fewer steps.
    assert "| none | 2 | 0.250 ± 0.071 (step 200) | 0.100 ± 0.000 | 175 ± 35 (2/2) | – | 1.000 ± 0.000 | (frozen) |" in table
    assert "| repa | 2 | 0.450 ± 0.071 (step 200) | 0.250 ± 0.071 | 83 ± 24 (2/2) | 2.10x vs none | 1.000 ± 0.000 | (frozen) |" in table
    assert "| repa_e | 1 | 0.400 (step 200) | 0.200 | 100 (1/1) | – | 1.000 | 0.800 |" in table
    assert (tmp_path / "out" / "m" / "t.png").stat().st_size > 0
    result = json.loads((tmp_path / "out" / "m" / "t.json").read_text())
    assert result["cells"]["repa"]["speedup"]["0.2"] == pytest.approx(175 / (250 / 3))


def test_clip_fidelity_merge_names_each_rows_commit_and_dirty_state():
    """A merged table says which command and commit made each row, and where the tree had uncommitted changes."""
    before = json.loads((ROOT / "benchmarks/results/cpu-intel-r-xeon-r-processor-2c/clip_fidelity.json").read_text())
    now = {**before, "command": "python -m benchmarks.clip_fidelity --variants vae --merge",
           "environment": {**before["environment"], "git_commit": "abc1234", "git_dirty": True},
           "variants": {"vae": before["variants"]["vae"]}, "robustness": {}, "sampler": {}}
    result = merged(before, now)
    assert result["made_by"][-1] == {"command": now["command"], "commit": "abc1234", "git_dirty": True, "variants": ["vae"]}
    assert all("vae" not in entry["variants"] for entry in result["made_by"][:-1])
    text = clip_fidelity_markdown(result)
    assert "Rows `vae`: `python -m benchmarks.clip_fidelity --variants vae --merge` at commit abc1234 + uncommitted changes." in text
    assert "at commit 4134dac." in text  # an entry written before the flag existed reads as clean


def test_a_peer_run_hands_out_its_table_after_each_group_of_rows(tmp_path):
    # The GPU check stops a step at its limit: the table so far must be on disk by then, not only at the end.
    from benchmarks.peer_dit import run_peer  # noqa: PLC0415
    from benchmarks.peer_tables import peer_markdown  # noqa: PLC0415

    peaks = {"fp32": {"flops_per_s": 1e9, "matmul_n": 256, "note": "made up"}, "bf16": {"flops_per_s": 2e9, "matmul_n": 256, "note": "made up"}}
    variants = (*switch_variants("diffusers")[:2], *switch_variants("unizoo")[:2])  # two groups: fp32 pair, bf16 pair
    partials = []
    final = run_peer(PeerConfig.quick(), torch.device("cpu"), peaks, variants, progress=lambda line: None,
                     explain=False, on_partial=partials.append)
    (partial,) = partials  # after the first group; the last group's table is the final one
    assert partial["partial"] == "2 of 4 rows: the run stopped before the others"
    assert [r["name"] for r in partial["rows"]] == ["diffusers fp32", "unizoo fp32"]
    assert partial["best_vs_best"]["ratio"] == partial["rows"][1]["images_per_s"] / partial["rows"][0]["images_per_s"]
    assert "partial" not in final and [r["name"] for r in final["rows"]] == [v.name for v in variants]
    assert "**Partial: 2 of 4 rows: the run stopped before the others.** Best vs best" in peer_markdown(partial, peaks)


def test_a_variants_run_hands_out_its_table_after_each_cell():
    cfg = replace(VariantsConfig.quick(), sizes=("huge",), select=("objective=mse", "strategy=joint"))  # fails fast
    peaks = {"fp32": {"flops_per_s": 1e9, "matmul_n": 256, "note": "made up: nothing is timed"}}
    partials = []
    final = run_variants(cfg, torch.device("cpu"), peaks, progress=lambda line: None, on_partial=partials.append)
    (partial,) = partials
    assert partial["partial"] == "1 of 2 cells and sizes: the run stopped before the others"
    assert len(partial["rows"]) == 1 and len(final["rows"]) == 2 and "partial" not in final
    assert "**Partial: 1 of 2 cells and sizes" in variants_markdown(partial, peaks)


def test_a_compiled_peer_draws_its_label_drops_as_the_eager_reference_does():
    # diffusers' DiT drops class labels with torch.rand inside its forward; inductor's own generator drew other
    # drops, and the compiled fp32 row failed its loss check (3e-3 here against 1e-3; 2.8e-2 at DiT-S/2).
    from benchmarks.peer_dit import run_peer  # noqa: PLC0415

    cfg = replace(PeerConfig.quick(), compile_backend="inductor", loss_steps=6, repeats=3)
    peaks = {"fp32": {"flops_per_s": 1e9, "matmul_n": 256, "note": "made up"}}
    plain, compiled = switch_variants("diffusers")[0], switch_variants("diffusers")[2]
    result = run_peer(cfg, torch.device("cpu"), peaks, (plain, compiled), progress=lambda line: None, explain=False)
    (check,) = result["loss_checks"]
    assert check["variant"] == "diffusers compile" and check["passed"] and check["max_rel_diff"] < 1e-5, check
