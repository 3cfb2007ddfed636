"""Many variants per machine: --parallel splits a CPU's cores, --per-device packs GPUs; failures stay with their variant."""

from __future__ import annotations

import csv
import json
import os

import pytest
import yaml

from conftest import TINY_OVERRIDES
from unizoo.cli import main
from unizoo.studies import packing
from unizoo.studies.launcher import LauncherError, LauncherSettings
from unizoo.studies.status import read_status
from unizoo.studies.variant import VariantJob, run_variant_group

CORES = packing.machine_cores()


def write_study(path, axes, seeds=1):
    path.write_text(yaml.safe_dump({"recipe": "default", "axes": axes, "common": TINY_OVERRIDES, "seeds": seeds}, sort_keys=False))
    return path


def test_gpu_slots_put_n_variants_on_each_gpu():
    slots = packing.gpu_slots(per_device=2, gpu_count=3)
    assert [slot.gpus for slot in slots] == [(0,), (1,), (2,), (0,), (1,), (2,)]  # the first variants spread over every GPU
    assert LauncherSettings(per_device=2).in_flight(10, gpu_count=3) == 6


def test_cpu_slots_split_the_cores():
    assert [(s.cpus, s.threads) for s in packing.cpu_slots(2, (0, 1))] == [((0,), 1), ((1,), 1)]
    assert [s.cpus for s in packing.cpu_slots(3, tuple(range(8)))] == [(0, 1, 2), (3, 4, 5), (6, 7)]
    with pytest.raises(ValueError, match="more variants at once than this machine's 2 cores"):
        packing.cpu_slots(3, (0, 1))


def test_variants_per_device_follow_one_variant_s_memory():
    gib = 2**30
    # 140 GiB, 1.4 GiB a variant + 0.6 GiB of CUDA context: 0.85 * 140 / 2 = 59.5, capped at 16.
    assert packing.per_device_from_memory(int(1.4 * gib), 140 * gib) == packing.MAX_PER_DEVICE
    assert packing.per_device_from_memory(int(9.4 * gib), 80 * gib) == 6  # 0.85 * 80 / 10 = 6.8
    assert packing.per_device_from_memory(100 * gib, 80 * gib) == 1  # never fewer than one


@pytest.mark.parametrize(("values", "message"), [
    ({"kind": "slurm", "parallel": 2}, "--parallel splits a CPU machine's cores"),
    ({"per_device": 2, "gpus_per_variant": 2}, "cannot go with --gpus-per-variant 2"),
    ({"parallel": 2, "jobs": 3}, "--jobs 3 and --parallel 2 disagree"),
    ({"per_device": 0}, "per_device must be a whole number of at least 1"),
])
def test_packing_settings_that_cannot_work_are_named(values, message):
    with pytest.raises(LauncherError, match=message):
        LauncherSettings.from_values(values)


def test_the_command_line_s_parallel_wins_over_the_study_file_s_jobs():
    settings = LauncherSettings.from_values({"kind": "local", "jobs": 1}, {"parallel": 2})
    assert (settings.jobs, settings.parallel, settings.in_flight(8)) == (None, 2, 2)
    settings = LauncherSettings.from_values({"parallel": 2}, {"jobs": 3})
    assert (settings.jobs, settings.parallel, settings.in_flight(8)) == (3, None, 3)


def test_a_packed_variant_gets_one_gpu():
    settings = LauncherSettings(per_device=4)
    assert settings.recipe_overrides() == ("trainer.accelerator=gpu", "trainer.devices=1")


@pytest.mark.skipif(len(CORES) < 2, reason="needs 2 cores to split")
def test_two_variants_run_at_once_each_with_its_own_seed_cores_and_output(tmp_path):
    study = write_study(tmp_path / "grid.yaml", [{"group": "strategy", "choices": {"generation": ["strategy.steps=6"]}}], seeds=2)
    out = tmp_path / "study"
    assert main(["study", str(study), "--out", str(out), "--parallel", "2"]) == 0
    folders = {seed: out / "variants" / f"generation-seed{seed}" for seed in (0, 1)}
    statuses = {seed: read_status(folder) for seed, folder in folders.items()}
    assert all(status["state"] == "done" for status in statuses.values())
    # At once: each started before the other finished.
    assert statuses[0]["started"] < statuses[1]["finished"] and statuses[1]["started"] < statuses[0]["finished"]
    recipes = {seed: json.loads(json.dumps(yaml.safe_load((folder / "run" / "recipe.yaml").read_text()))) for seed, folder in folders.items()}
    assert (recipes[0]["seed"], recipes[1]["seed"]) == (0, 1)
    losses = {}
    for seed, folder in folders.items():
        with open(folder / "run" / "logs" / "generation" / "metrics.csv") as handle:
            losses[seed] = [row["train/loss"] for row in csv.DictReader(handle) if row.get("train/loss")]
        logs = "".join(path.read_text() for path in (folder / "submitit").glob("*_log.err"))
        assert f"variant generation-seed{seed}: 1 torch threads on cores {CORES[seed]}" in logs
    assert losses[0] and losses[0] != losses[1]  # two runs, two seeds: their own outputs


def test_a_failed_variant_leaves_the_other_finishing_beside_it(tmp_path):
    study = write_study(tmp_path / "grid.yaml", [{"group": "strategy", "choices": {
        "generation": ["strategy.steps=4"],
        "joint": ["strategy.steps=4", "debug.nan_at=joint:2"],  # stops on a NaN at its second step
    }}])
    out = tmp_path / "study"
    assert main(["study", str(study), "--out", str(out), "--parallel", "2"]) == 1
    assert read_status(out / "variants" / "generation-seed0")["state"] == "done"
    failed = read_status(out / "variants" / "joint-seed0")
    assert failed["state"] == "failed" and "non-finite loss" in failed["error"]
    assert "| joint | 0 | failed |" in (out / "results.md").read_text()


def test_a_gpu_job_of_several_variants_runs_them_all_whatever_one_does(tmp_path):
    # SLURM with --per-device: one job holds several variants; here two on the CPU, one of them broken.
    jobs = [VariantJob(f"v{i}", "default", (*TINY_OVERRIDES, "strategy.steps=2", *extra), str(tmp_path / f"v{i}"))
            for i, extra in enumerate(([], ["generator.size=huge"]))]
    outcomes = run_variant_group(jobs)
    assert read_status(tmp_path / "v0")["state"] == "done" and outcomes[0].endswith("v0/run")
    assert read_status(tmp_path / "v1")["state"] == "failed" and outcomes[1].startswith("v1: ")
