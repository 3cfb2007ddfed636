"""`unizoo study`: the smoke grid end to end, resume after a real kill, a broken cell, SLURM submission without a cluster."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import TINY_OVERRIDES
from unizoo.cli import main
from unizoo.config.composition import compose_recipe
from unizoo.studies.launcher import LauncherError, LauncherSettings
from unizoo.studies.runner import _slurm_job_active
from unizoo.studies.status import DONE, FAILED, RUNNING, process_alive, read_status
from unizoo.studies.study import load_study, study_names
from unizoo.studies.variant import VariantJob, error_line, run_variant

SMOKE_VARIANTS = ["mse+joint", "mse+sequential", "flow_matching+joint", "flow_matching+sequential"]


def rows(folder):
    with open(folder / "results.csv") as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------ the smoke study, end to end


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    code = main(["study", "smoke", "--out", str(out)])
    return out, code


def test_smoke_study_trains_every_variant_and_writes_the_results(smoke):
    out, code = smoke
    assert code == 0
    table = rows(out)
    assert [r["variant"] for r in table] == SMOKE_VARIANTS and all(r["status"] == "done" for r in table)
    for row in table:
        for column in ("overall", "untrained_overall", "single_object", "untrained_counting", "fid", "untrained_fid",
                       "diversity", "understanding_overall", "untrained_understanding_overall", "total_params", "steps"):
            assert row[column] != "", (row["variant"], column)
        assert 0 <= float(row["overall"]) <= 1 and float(row["fid"]) > 0
        stages = ["joint"] if row["strategy"] == "joint" else ["understanding", "generation"]
        for stage in stages:
            assert float(row[f"images_per_s_{stage}"]) > 0 and float(row[f"train_seconds_{stage}"]) > 0
            assert 0 < int(row[f"trainable_params_{stage}"]) < int(row["total_params"])
        # MSE draws one image per prompt whatever the noise; flow matching does not.
        if row["objective"] == "mse":
            assert float(row["diversity"]) == 0
        else:
            assert float(row["diversity"]) > 0.01
    markdown = (out / "results.md").read_text()
    assert "4 of 4 variants done" in markdown and "**" in markdown
    for name in SMOKE_VARIANTS:
        assert f"| {name} | 1/1 |" in markdown
    for figure in ("overall_vs_steps.png", "overall_vs_time.png", "fid.png", "diversity.png", "samples.png"):
        assert (out / figure).stat().st_size > 5000, figure
    assert (out / "command.txt").read_text().splitlines()[-1] == f"unizoo study smoke --out {out}"


def test_smoke_study_keeps_each_variants_recipe_curve_and_samples(smoke):
    out, _ = smoke
    for name in SMOKE_VARIANTS:
        recipe = yaml.safe_load((out / "recipes" / f"{name}-seed0.yaml").read_text())
        objective, strategy = name.split("+")
        assert recipe["seed"] == 0 and recipe["evaluation"]["prompts"] == 32 and recipe["evaluation"]["fid"] is True
        assert recipe["strategy"]["_target_"].endswith(f".{strategy}.{strategy}")
        variant = out / "variants" / f"{name}-seed0"
        metrics = json.loads((variant / "run" / "metrics.json").read_text())
        # A point before training, every 4 steps, and at each stage's end.
        assert [p["steps"] for p in metrics["curve"]] == ([0, 4, 8] if strategy == "joint" else [0, 4, 8, 12])
        samples = __import__("torch").load(variant / "samples.pt", weights_only=False)
        assert samples["images"].shape == (8, 3, 32, 32) and len(samples["prompts"]) == 8
    prompts = {tuple(__import__("torch").load(out / "variants" / f"{n}-seed0" / "samples.pt", weights_only=False)["prompts"])
               for n in SMOKE_VARIANTS}
    assert len(prompts) == 1  # every variant drew the same prompts


def test_a_second_run_of_a_finished_study_trains_nothing(smoke, capsys):
    out, _ = smoke
    before = {p: p.stat().st_mtime_ns for p in (out / "variants").glob("*/run/metrics.json")}
    assert main(["study", "smoke", "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "variants").glob("*/run/metrics.json")} == before
    skipped = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[unizoo] study [")]
    assert len(skipped) == 4 and all("skip" in line and "done in an earlier run" in line for line in skipped)


# ------------------------------------------------------------------ killed part-way, and a broken cell


def write_study(path, axes, common=()):
    path.write_text(yaml.safe_dump({"recipe": "default", "axes": axes, "common": [*TINY_OVERRIDES, *common]}, sort_keys=False))
    return path


def test_a_killed_study_resumes_without_retraining_and_reports_a_broken_cell(tmp_path, capsys):
    study = write_study(tmp_path / "grid.yaml", [{"group": "strategy", "choices": {
        "generation": ["strategy.steps=4"],
        "joint": ["strategy.steps=6"],
        "sequential": ["generator.size=huge"],  # composes, but the generator refuses to build
    }}])
    out = tmp_path / "study"
    folders = {name: out / "variants" / f"{name}-seed0" for name in ("generation", "joint", "sequential")}
    process = subprocess.Popen([sys.executable, "-m", "unizoo.cli", "study", str(study), "--out", str(out)],
                               stdout=subprocess.DEVNULL, stderr=open(tmp_path / "first.log", "w"))
    try:
        deadline = time.monotonic() + 300
        while not (read_status(folders["generation"]).get("state") == DONE and read_status(folders["joint"]).get("state") == RUNNING):
            assert process.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first variant did not finish in time"
            time.sleep(0.2)
        # The report so far is written after each variant, while the next one trains.
        assert "1 of 3 variants done" in (out / "results.md").read_text()
        finished = folders["generation"] / "run" / "metrics.json"
        finished_mtime, finished_status = finished.stat().st_mtime_ns, read_status(folders["generation"])
        killed_pid = read_status(folders["joint"])["pid"]
        os.kill(process.pid, signal.SIGKILL)  # mid-way through the second variant
    finally:
        process.kill()
        process.wait()
    # The running variant ends itself once its study is gone: no orphan keeps training.
    deadline = time.monotonic() + 30
    while process_alive(killed_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not process_alive(killed_pid)
    assert read_status(folders["joint"])["state"] == FAILED and read_status(folders["sequential"]).get("state") is None

    assert main(["study", str(study), "--out", str(out)]) == 1  # one variant failed
    err = capsys.readouterr().err
    assert "skip    generation-seed0: done in an earlier run" in err
    assert finished.stat().st_mtime_ns == finished_mtime  # not retrained
    assert read_status(folders["generation"])["started"] == finished_status["started"]
    assert read_status(folders["joint"])["state"] == DONE
    broken = read_status(folders["sequential"])
    assert broken["state"] == FAILED and broken["error"].startswith("ValueError") and "huge" in broken["error"]
    assert "Traceback" in (folders["sequential"] / "error.txt").read_text()
    table = {r["variant"]: r for r in rows(out)}
    assert table["generation"]["status"] == table["joint"]["status"] == "done"
    assert table["sequential"]["status"] == "failed" and table["sequential"]["error"] == broken["error"]
    markdown = (out / "results.md").read_text()
    assert "2 of 3 variants done" in markdown and f"| sequential | 0 | failed | {broken['error']} |" in markdown


def test_a_cell_whose_recipe_does_not_compose_fails_alone_without_a_job(tmp_path):
    study = write_study(tmp_path / "grid.yaml", [{"group": "objective", "choices": {"mse": ["objective.no_such_key=1"]}}])
    out = tmp_path / "study"
    assert main(["study", str(study), "--out", str(out)]) == 1
    status = read_status(out / "variants" / "mse-seed0")
    assert status["state"] == FAILED and status["error"].startswith("RecipeError") and "no_such_key" in status["error"]
    assert not (out / "variants" / "mse-seed0" / "job.json").exists()


# ------------------------------------------------------------------ the table, from any metrics


def fake_variant(out, variant, overall, strict, fid, state="done"):
    """A finished variant's folder as train() and run_variant() leave it, with made-up scores."""
    folder = out / "variants" / variant.name
    (folder / "run").mkdir(parents=True)
    (folder / "status.json").write_text(json.dumps({"state": state, "error": "ValueError: boom" if state == "failed" else None}))
    scores = lambda o, s, f: {"generation": {"overall": o, "strict_overall": s, "n": 256}, "fid": f}  # noqa: E731
    training = {"generation": {"steps": 10, "train_seconds": 60.0, "images_per_s": 100.0, "trainable_params": 10, "total_params": 20}}
    (folder / "run" / "metrics.json").write_text(json.dumps({
        "untrained": scores(0.1, 0.0, 300.0), "generation": scores(overall, strict, fid), "training": training,
        "curve": [{"steps": 0, "train_seconds": 0, **scores(0.1, 0.0, 300.0)}, {"steps": 10, "train_seconds": 60.0, **scores(overall, strict, fid)}],
    }))


def test_every_float_an_evaluator_returns_reaches_the_tables(tmp_path):
    from unizoo.studies.report import write_report  # noqa: PLC0415

    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"axes": [{"group": "objective", "choices": {"mse": [], "flow_matching": []}}], "seeds": 2},
                                   sort_keys=False))
    study = load_study(path)
    variants = study.variants()
    out = tmp_path / "study"
    scores = {("mse", 0): (0.30, 0.05, 50.0), ("mse", 1): (0.34, 0.07, 54.0),
              ("flow_matching", 0): (0.50, 0.20, 20.0), ("flow_matching", 1): (0.54, 0.22, 30.0)}
    for variant in variants:
        fake_variant(out, variant, *scores[(variant.cell.name, variant.seed)])
    written = write_report(out, study, variants)
    table = rows(out)
    # strict_overall is no key the study code knows: it flows through as it is.
    assert [(r["variant"], r["seed"], r["strict_overall"], r["untrained_strict_overall"]) for r in table][:2] == [
        ("mse", "0", "0.05", "0"), ("flow_matching", "0", "0.2", "0")]
    assert "n" not in table[0]  # counts are not scores
    markdown = (out / "results.md").read_text()
    # Mean +- sample std over two seeds; the best mean in bold: highest score, lowest FID.
    assert "| flow_matching | 2/2 | **0.520 ± 0.028** |" in markdown
    assert "| mse | 2/2 | 0.320 ± 0.028 |" in markdown
    assert "**0.210 ± 0.014**" in markdown and "**25.00 ± 7.07**" in markdown and "52.00 ± 2.83" in markdown
    assert "strict overall" in markdown
    assert {"csv", "markdown", "overall_vs_steps", "overall_vs_time", "fid"} <= set(written)


# ------------------------------------------------------------------ the grid, seeds and bad input


def test_seeds_per_cell_and_their_order(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({
        "axes": [{"group": "objective", "choices": {"mse": [], "flow_matching": []}},
                 {"group": "strategy", "choices": {"joint": [], "sequential": []}}],
        "seeds": 1, "seeds_for": [{"where": {"strategy": "sequential"}, "seeds": 3}],
    }, sort_keys=False))
    study = load_study(path)
    names = [v.name for v in study.variants()]
    # Seed 0 of every cell first, so a study cut short still covers the grid.
    assert names == ["mse+joint-seed0", "mse+sequential-seed0", "flow_matching+joint-seed0", "flow_matching+sequential-seed0",
                     "mse+sequential-seed1", "flow_matching+sequential-seed1", "mse+sequential-seed2", "flow_matching+sequential-seed2"]
    assert study.variants()[4].overrides[-1] == "seed=1"
    assert len(study.variants(seeds=2)) == 8
    assert [v.name for v in study.variants(study.parse_select(["objective=mse"]), seeds=1)] == ["mse+joint-seed0", "mse+sequential-seed0"]


def test_shipped_studies_compose_every_variant():
    assert {"smoke", "design_space"} <= set(study_names())
    for name in study_names():
        study = load_study(name)
        for variant in study.variants():
            recipe = compose_recipe(study.recipe, variant.overrides)
            assert recipe.seed == variant.seed


@pytest.mark.parametrize(("arguments", "message"), [
    (["study", "nope"], "unknown study 'nope'"),
    (["study", "smoke", "--select", "objective=diffusion"], "choices of objective are mse, flow_matching"),
    (["study", "smoke", "--seeds", "0"], "--seeds must be at least 1"),
    (["study", "smoke", "--partition", "gpu"], "only apply to --launcher slurm"),
    (["study", "smoke", "--launcher", "slurm"], "needs SLURM's srun and sbatch"),
])
def test_bad_input_exits_2_with_one_paragraph(arguments, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun here
    assert main([*arguments, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unknown_keys_in_a_study_file_are_named(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"axes": [{"group": "objective", "choices": {"mse": []}}], "seed": 2}, sort_keys=False))
    with pytest.raises(ValueError, match=r"unknown keys \['seed'\]"):
        load_study(path)
    with pytest.raises(LauncherError, match="unknown launcher settings"):
        LauncherSettings.from_values({"gpus": 2})


def test_error_line_is_the_root_cause():
    try:
        try:
            raise ValueError("first line\ngenerator.size='huge': valid sizes are tiny, S, B, L, XL")
        except ValueError as cause:
            raise RuntimeError("Error in call to target\nfull_key: generator") from cause
    except RuntimeError as error:
        assert error_line(error) == "ValueError: generator.size='huge': valid sizes are tiny, S, B, L, XL"


# ------------------------------------------------------------------ SLURM, without a cluster


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """srun, sbatch and sacct stand-ins: sbatch keeps the script and answers job 4242; sacct reports $FAKE_SACCT_STATE."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "srun": "#!/bin/sh\nexit 0\n",
        "sbatch": f"#!/bin/sh\ncp \"$1\" {tmp_path}/sbatch_script.sh\necho 'Submitted batch job 4242'\n",
        "sacct": "#!/bin/sh\nprintf 'JobID|State|NodeList\\n4242|%s|node1\\n' \"$FAKE_SACCT_STATE\"\n",
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def test_slurm_launcher_submits_the_right_sbatch_script(fake_slurm):
    settings = LauncherSettings.from_values(
        {"kind": "slurm", "partition": "gpu", "time_min": 90},
        {"gpus_per_variant": 2, "cpus_per_task": 8, "mem_gb": 32, "account": "lab", "setup": ["source .venv/bin/activate"]},
    )
    folder = fake_slurm / "variant"
    job = settings.executor(folder / "submitit", "clip+flow_matching+joint-seed0").submit(
        run_variant, VariantJob("clip+flow_matching+joint-seed0", "default", ("seed=0",), str(folder)))
    assert job.job_id == "4242"
    script = (fake_slurm / "sbatch_script.sh").read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --gpus-per-node=2", "#SBATCH --ntasks-per-node=2",
                 "#SBATCH --nodes=1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB", "#SBATCH --account=lab",
                 "#SBATCH --job-name=clip+flow_matching+joint-seed0", "source .venv/bin/activate"):
        assert line in script.splitlines(), line
    assert "srun --unbuffered" in script and "-m submitit.core._submit" in script
    # One process per GPU: the variant's recipe trains data-parallel over NCCL on both.
    recipe = compose_recipe("default", settings.recipe_overrides())
    assert (recipe.trainer.accelerator, recipe.trainer.devices) == ("gpu", 2)
    assert recipe.trainer.strategy.process_group_backend == "nccl"
    assert LauncherSettings(kind="slurm").in_flight(8) == 8 and LauncherSettings().in_flight(8) == 1


def test_a_rerun_reattaches_to_a_slurm_job_still_running(fake_slurm, monkeypatch):
    folder = fake_slurm / "variant"
    folder.mkdir()
    (folder / "job.json").write_text(json.dumps({"launcher": "slurm", "job_id": "4242"}))
    (folder / "status.json").write_text(json.dumps({"state": RUNNING}))
    monkeypatch.setenv("FAKE_SACCT_STATE", "RUNNING")
    assert _slurm_job_active(folder).job_id == "4242"
    (folder / "status.json").write_text(json.dumps({"state": FAILED}))
    assert _slurm_job_active(folder) is None  # failed: submitted again


def test_slurm_with_per_device_submits_one_gpu_job_for_several_variants(fake_slurm):
    from unizoo.studies.variant import run_variant_group

    settings = LauncherSettings.from_values({"kind": "slurm", "per_device": 3})
    folder = fake_slurm / "group"
    specs = [VariantJob(f"v{i}-seed0", "default", (f"seed={i}",), str(folder / f"v{i}")) for i in range(3)]
    job = settings.executor(folder / "submitit", "v0+v1+v2", None).submit(run_variant_group, specs)
    assert job.job_id == "4242"
    script = (fake_slurm / "sbatch_script.sh").read_text().splitlines()
    assert "#SBATCH --gpus-per-node=1" in script and "#SBATCH --ntasks-per-node=1" in script
    assert settings.recipe_overrides() == ("trainer.accelerator=gpu", "trainer.devices=1")


def test_the_long_study_composes_and_builds_every_cell():
    from hydra.utils import instantiate

    from unizoo.components.strategies.stages import UntilFlat
    from unizoo.config.recipe_types import check_recipe_types
    from unizoo.training.build import build_model

    study = load_study("design_space_long")
    variants = study.variants()
    assert len(variants) == 16 and sorted({v.seed for v in variants}) == [0, 1]
    for variant in variants:
        recipe = compose_recipe(study.recipe, variant.overrides)
        check_recipe_types(recipe)
        stages = instantiate(recipe.strategy).stages
        assert stages[-1].until_flat == UntilFlat(window=3, min_gain=0.01, max_steps=6000)
        assert (recipe.evaluation.prompts, recipe.evaluation.every_n_steps, recipe.evaluation.fid) == (256, 500, True)
        clip, flow = variant.cell.choices["representation"] == "clip", variant.cell.choices["objective"] == "flow_matching"
        assert recipe.objective.get("prediction") == ("x0" if clip and flow else "velocity" if flow else None)  # overrides_for
    for cell in study.cells():
        model = build_model(compose_recipe(study.recipe, cell.overrides))
        assert len(model.generator.blocks) == (8 if cell.choices["representation"] == "clip" else 4)


def test_overrides_for_names_only_choices_of_the_axes(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"axes": [{"group": "objective", "choices": {"mse": []}}],
                                    "overrides_for": [{"where": {"objective": "diffusion"}, "overrides": ["seed=3"]}]}))
    with pytest.raises(ValueError, match="overrides_for names {'objective': 'diffusion'}"):
        load_study(path)
