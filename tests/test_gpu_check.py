"""The GPU check runs unattended: without a GPU it says so; its summary reports every step and target, missing ones as missing."""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a top-level package of the repository, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import gpu_summary  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_without_a_gpu_the_check_says_so_and_writes_nothing(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "OUT": str(tmp_path),
                                 # the script calls `python`: this interpreter's, activated or not
                                 "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"})
    assert result.returncode == 2
    assert result.stderr.startswith("gpu_check: no CUDA GPU is visible to torch")
    assert not any(tmp_path.iterdir())


# Stand-ins for the commands gpu_check.sh runs, so that its own machinery (a time limit per step, a step
# that fails or runs out of time recorded and the next one run, the summary written last) runs here.
_FAKE_PYTHON = """#!/usr/bin/env bash
case "$*" in
    *"torch.cuda.is_available()"*) exit 0 ;;                      # a GPU is visible
    *machine_slug*) echo cuda-fake-gpu ;;
    "-m pytest"*) echo "python $*" ; echo "3 passed" ;;
    "-m benchmarks.run loop"*) echo "killed at its limit" ; exit 124 ;;   # what `timeout` returns for a step it stopped
    "-m benchmarks.run attention"*) echo "Traceback: no kernel" >&2 ; exit 1 ;;
    "-m benchmarks.run"*) echo "table written" ;;
    "-m benchmarks.gpu_summary"*) exec "$REAL_PYTHON" "$@" ;;
    *) echo "unexpected python $*" >&2 ; exit 3 ;;
esac
"""
_FAKE_UNIZOO = """#!/usr/bin/env bash
for word in "$@"; do case "$word" in run_dir=*) run="${word#run_dir=}" ;; esac; done
[ -n "${UNIZOO_CACHE:-}" ] || { echo "no empty cache given" >&2; exit 3; }
mkdir -p "$run"
echo '{"seconds_total": 70.0, "training": {"generation": {"images_per_s": 11000.0}}}' > "$run/metrics.json"
echo "done" > "$run/train.log"
"""


@pytest.mark.skipif(sys.platform == "win32", reason="the check is a bash script")
def test_the_check_runs_every_step_unattended_and_records_the_failed_ones(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python", _FAKE_PYTHON), ("unizoo", _FAKE_UNIZOO)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out = tmp_path / "results"
    # An earlier check's files: its logs go, its tables stay (committed ones among them) but are not read as this one's.
    (out / "cuda-fake-gpu" / "gpu_check" / "first_run").mkdir(parents=True)
    (out / "cuda-fake-gpu" / "gpu_check" / "first_run" / "samples_generation.png").write_bytes(b"an earlier check's")
    earlier_xl = out / "cuda-fake-gpu" / "peer_dit_xl.json"
    earlier_xl.write_text(json.dumps({"rows": [], "best_vs_best": {"unizoo": {"mfu": 0.45}, "peer": {}, "ratio": 1.3}}))
    os.utime(earlier_xl, (1_700_000_000, 1_700_000_000))
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "OUT": str(out), "REAL_PYTHON": sys.executable,
                                              "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"})
    assert result.returncode == 0, result.stderr
    logs = out / "cuda-fake-gpu" / "gpu_check"
    with (logs / "steps.tsv").open() as file:
        rows = list(csv.DictReader(file, delimiter="\t"))
    assert [(r["step"], r["status"]) for r in rows] == [
        ("tests", "ok"), ("first_run", "ok"), ("loop", "timed out"), ("attention", "failed (exit 1)"),
        ("peer_s", "ok"), ("peer_xl", "ok"), ("variants", "ok")]
    assert [int(r["limit_s"]) for r in rows] == [60, 120, 40, 30, 65, 120, 45]
    assert sum(int(r["limit_s"]) for r in rows) <= 8 * 60  # the 8 minutes, every step at its limit
    assert "Traceback: no kernel" in (logs / "attention.log").read_text()  # each step's output kept
    assert json.loads((logs / "first_run" / "metrics.json").read_text())["seconds_total"] == 70.0
    summary = json.loads((out / "cuda-fake-gpu" / "gpu_check.json").read_text())
    assert [s["status"] for s in summary["steps"]] == [r["status"] for r in rows]
    targets = {t["target"]: t for t in summary["targets"]}
    assert targets["generation_images_per_s"]["measured"] == 11000.0  # eager: no compile to leave out
    assert targets["generation_images_per_s_with_compile"]["measured"] == 11000.0
    assert "| attention | failed (exit 1) |" in (out / "cuda-fake-gpu" / "gpu_check.md").read_text()
    assert not (logs / "first_run" / "samples_generation.png").exists()  # the fake run wrote none: the earlier one is gone
    assert earlier_xl.is_file() and targets["xl_mfu"]["measured"] is None  # kept, not read: this check wrote no XL table
    assert "peer_dit_xl.json" in summary["tables_not_written"]
    # The tests step runs every cuda-marked test but the benchmarks' quick run, which steps 3 to 7 cover at full size.
    deselected = "tests/test_benchmarks.py::test_quick_run_on_cuda"
    assert f"--deselect {deselected}" in (logs / "tests.log").read_text()
    assert "def test_quick_run_on_cuda(" in (ROOT / deselected.split("::")[0]).read_text()  # pytest ignores a stale id


def _results(tmp_path: Path, first_run_status: str = "ok") -> Path:
    results = tmp_path / "cuda-nvidia-h200"
    (results / "gpu_check" / "first_run").mkdir(parents=True)
    (results / "gpu_check" / "steps.tsv").write_text(
        "step\tstatus\tms\tlimit_s\n"
        "tests\tok\t41200\t60\n"
        f"first_run\t{first_run_status}\t84500\t120\n"
        "loop\tok\t31000\t40\n"
        "attention\tok\t30100\t45\n"
        "peer_s\tok\t60000\t65\n"
        "peer_xl\ttimed out\t120000\t120\n"
        "variants\tfailed (exit 1)\t9000\t30\n"
    )
    metrics = {"seconds_total": 80.1, "training": {"generation": {"images_per_s": 7500.0, "compile_seconds": 12.0,
                                                                  "images_per_s_after_compile": 38000.0}},
               "generation": {"generation": {"overall": 0.55}}}
    (results / "gpu_check" / "first_run" / "metrics.json").write_text(json.dumps(metrics))
    parts = [{"part": "the encoder", "operators": 111, "one_image_ms": 0.9, "batch_ms": 1.0},
             {"part": "the tokenizer", "operators": 0, "one_image_ms": 0.05, "batch_ms": 0.6},
             {"part": "the generator", "operators": 917, "one_image_ms": 4.1, "batch_ms": 4.2}]
    loop = {"rows": [{"overhead": 0.052, "overhead_low": 0.031, "overhead_high": 0.094, "bare_images_per_s": 9100.0,
                      "eager_ceiling_images_per_s": 9800.0, "operators_per_step": 1367, "generator_compiled": False,
                      "step_parts": parts}]}
    (results / "loop.json").write_text(json.dumps(loop))
    return results


def test_the_summary_holds_each_measured_target_and_reports_missing_ones(tmp_path, capsys):
    results = _results(tmp_path)
    assert gpu_summary.main([str(results)]) == 0
    summary = json.loads((results / "gpu_check.json").read_text())
    assert [s["status"] for s in summary["steps"]] == ["ok", "ok", "ok", "ok", "ok", "timed out", "failed (exit 1)"]
    targets = {t["target"]: t for t in summary["targets"]}
    # The stage trains at 38,000 images/s once compiled; over its wall clock, the 12 s compile in it, 7,500.
    assert targets["generation_images_per_s"]["measured"] == 38000.0 and targets["generation_images_per_s"]["holds"] is True
    with_compile = targets["generation_images_per_s_with_compile"]
    assert with_compile["measured"] == 7500.0 and with_compile["holds"] is False
    assert targets["first_run_s"]["measured"] == 84.5 and targets["first_run_s"]["holds"] is True
    assert targets["xl_mfu"]["measured"] is None and targets["xl_mfu"]["holds"] is None  # its step timed out
    markdown = (results / "gpu_check.md").read_text()
    assert "| peer_xl | timed out | 120.0 | 120 |" in markdown
    assert ("- first run's generator and language model: compiled in 12.0 s; its stage trained at 38,000 images/s after that, "
            "7,500 images/s over its wall clock with the compile") in markdown
    assert ("| the same stage's images/s over its whole wall clock, the compile included | >= 10000 | 7,500 | **no** |"
            in markdown)
    assert "| unizoo at DiT-XL/2, batch 256, bf16: MFU of the measured matmul peak | >= 0.4 | missing (its step did not finish) | – |" in markdown
    assert ("- default recipe's step (`loop.md`, the generator and language model eager): bare step 9,100 images/s, loop overhead 5.2% "
            "(blocks 3.1% to 9.4%); 1367 operators per eager step; the step on one image allows at most 9,800 images/s "
            "(batch / the bare step on one image)\n") in markdown
    # Which part pays the host's cost, costliest first on one image.
    assert ("- its parts on one image, costliest first: the generator 4.10 ms (917 operators); the encoder 0.90 ms "
            "(111 operators); the tokenizer 0.05 ms (0 operators)") in markdown
    (results / "loop.json").unlink()  # the loop step did not finish
    assert gpu_summary.main([str(results)]) == 0
    assert "- default recipe's step (`loop.md`): missing (its step did not finish)" in (results / "gpu_check.md").read_text()


def test_the_summary_lists_every_row_that_did_not_run_and_reads_no_table_older_than_the_check(tmp_path):
    results = _results(tmp_path)
    (results / "gpu_check" / "started").write_text("1800000000\n")
    for path in (results / "loop.json", results / "gpu_check" / "first_run" / "metrics.json"):
        os.utime(path, (1_800_000_100, 1_800_000_100))
    (results / "attention.json").write_text(json.dumps({"rows": [
        {"backend": "sdpa", "precision": "bf16", "seq_len": 256, "status": "ok"},
        {"backend": "xformers", "precision": "bf16", "seq_len": 256, "status": "skipped: xformers not installed"},
        {"backend": "math", "precision": "bf16", "seq_len": 4096, "status": "failed: out of memory"}]}))
    (results / "peer_dit.json").write_text(json.dumps({"rows": [
        {"name": "unizoo bf16+compile", "status": "skipped: NotImplementedError: No operator found | for this"},
        {"name": "diffusers bf16", "status": "ok"}],
        "loss_checks": [{"variant": "unizoo bf16", "max_rel_diff": 0.3, "tolerance_rel": 0.05, "passed": False},
                        {"variant": "unizoo fp32", "max_rel_diff": 1e-6, "tolerance_rel": 1e-4, "passed": True}],
        "partial": "2 of 14 rows: the run stopped before the others"}))  # written before its step's limit stopped it
    for name in ("attention", "peer_dit"):
        os.utime(results / f"{name}.json", (1_800_000_200, 1_800_000_200))
    (results / "variants.json").write_text(json.dumps({"rows": [{"name": "vae mse joint", "status": "failed: RecipeError: x"}]}))
    os.utime(results / "variants.json", (1_700_000_000, 1_700_000_000))  # an earlier check's: not this one's

    assert gpu_summary.main([str(results)]) == 0
    summary = json.loads((results / "gpu_check.json").read_text())
    assert summary["rows_not_run"] == [
        {"table": "attention", "row": "xformers bf16 seq_len 256", "status": "skipped: xformers not installed"},
        {"table": "attention", "row": "math bf16 seq_len 4096", "status": "failed: out of memory"},
        {"table": "peer_dit", "row": "unizoo bf16+compile", "status": "skipped: NotImplementedError: No operator found | for this"},
        {"table": "peer_dit", "row": "the rest", "status": "not run: 2 of 14 rows: the run stopped before the others"},
        {"table": "peer_dit", "row": "unizoo bf16", "status": "loss check failed: max rel diff 0.3 above its tolerance 0.05"}]
    assert summary["tables_not_written"] == ["peer_dit_xl.json", "variants.json"]
    markdown = (results / "gpu_check.md").read_text()
    assert "Rows of the tables that did not run or did not pass: 3 failed, 2 skipped" in markdown
    assert "| peer_dit | unizoo bf16+compile | skipped: NotImplementedError: No operator found / for this |" in markdown
    assert ("Tables this check did not write (their step failed or ran out of time; an earlier check's, if any, was not read): "
            "`peer_dit_xl.json`, `variants.json`.") in markdown
    assert summary["measured"]["loop_overhead"] == 0.052  # written after the check began: read
    os.utime(results / "loop.json", (1_700_000_000, 1_700_000_000))
    assert gpu_summary.measured(results, gpu_summary.steps(results)).get("loop_overhead") is None


def test_a_first_run_that_failed_has_no_time(tmp_path):
    results = _results(tmp_path, first_run_status="failed (exit 1)")
    values = gpu_summary.measured(results, gpu_summary.steps(results))
    assert "first_run_s" not in values  # a failed run's wall time is no first-run time
    (results / "peer_dit_xl.json").write_text(json.dumps({"best_vs_best": {
        "unizoo": {"variant": "unizoo bf16+compile+fused", "mfu": 0.31}, "peer": {"variant": "diffusers bf16+compile+fused"},
        "ratio": 1.25}}))
    verdicts = {v["target"]: v["holds"] for v in gpu_summary.verdicts(gpu_summary.measured(results, gpu_summary.steps(results)))}
    assert verdicts == {"generation_images_per_s": True, "generation_images_per_s_with_compile": False,
                        "first_run_s": None, "xl_mfu": False, "xl_ratio": True}


def _benchmark_commands() -> list[list[str]]:
    """The arguments of every `python -m benchmarks.run` step of gpu_check.sh, with `$OUT_ROOT` filled in."""
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text().replace("\\\n", " ")
    commands = []
    for line in script.splitlines():
        words = shlex.split(line.replace('"$OUT_ROOT"', "results"), comments=True)
        if words[:1] == ["step"] and words[3:6] == ["python", "-m", "benchmarks.run"]:
            commands.append(words[6:])
    return commands


def test_every_benchmark_step_of_the_check_parses_and_the_loop_runs_eager():
    # A flag the benchmark does not know would only fail on the GPU machine, one step lost there.
    from benchmarks.run import _loop_config, build_parser

    commands = _benchmark_commands()
    assert [c[0] for c in commands] == ["loop", "attention", "peer", "peer", "variants"]
    parser = build_parser()
    parsed = [parser.parse_args(arguments) for arguments in commands]
    loop = _loop_config(parsed[0])
    assert loop.steps == 300 and loop.bare_steps == 50 and loop.extra_overrides == ("compile=false",)
    from benchmarks.run import _configs, _variants_config  # noqa: PLC0415

    cuda = torch.device("cuda")  # only named: building the configurations asks nothing of the device
    peer_s, peer_xl = (_configs(arguments, cuda)[1] for arguments in parsed[2:4])
    assert (peer_s.max_profiles, peer_xl.max_profiles) == (1, 0) and peer_xl.depth == 28 and peer_xl.batch == 256
    variants = _variants_config(parsed[4], parser)
    assert variants.sizes == ("S", "XL") and variants.select == ("objective=flow_matching", "strategy=joint")
