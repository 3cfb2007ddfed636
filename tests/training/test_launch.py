"""Multi-process and multi-node launches: the composed trainer reads torchrun's and SLURM's environment,
every process of one launch shares one run directory, and a real torchrun launch trains."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero

from conftest import STAGE_STEPS, TINY_OVERRIDES
from unizoo.config.composition import RecipeError, compose_recipe
from unizoo.training.launch import RUN_DIR_VARIABLE, is_primary, launched_processes, shared_run_dir

LAUNCH_VARIABLES = [
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
    "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID",
    "SLURM_NODELIST", "SLURM_JOB_ID", "SLURM_JOB_NAME", RUN_DIR_VARIABLE,
]


@pytest.fixture
def clean_launch_env(monkeypatch):
    for variable in LAUNCH_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(rank_zero.rank_zero_only, "rank", 0)  # Trainer() may set it from the environment
    return monkeypatch


def two_nodes_of_eight():
    recipe = compose_recipe("default", ["trainer=ddp", "trainer.num_nodes=2", "trainer.devices=8"])
    return instantiate(recipe.trainer, max_steps=1, logger=False, enable_checkpointing=False)


def test_two_nodes_of_eight_devices_compose_without_starting(clean_launch_env):
    trainer = two_nodes_of_eight()
    assert isinstance(trainer.strategy, DDPStrategy)
    assert (trainer.num_nodes, trainer.num_devices, trainer.world_size) == (2, 8, 16)
    assert trainer.strategy._start_method == "popen"  # under torchrun / srun: no processes of its own
    assert not torch.distributed.is_initialized()  # built, not started


def test_the_trainer_reads_slurm_ranks(clean_launch_env):
    for variable, value in {"SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
                            "SLURM_NODEID": "1", "SLURM_NODELIST": "gpu[01-02]", "SLURM_JOB_ID": "4242",
                            "SLURM_JOB_NAME": "unizoo"}.items():
        clean_launch_env.setenv(variable, value)
    trainer = two_nodes_of_eight()
    environment = trainer.strategy.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.main_address == "gpu01"
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank, trainer.world_size) == (9, 1, 1, 16)
    assert not is_primary() and launched_processes() == 16


def test_the_trainer_reads_torchrun_ranks(clean_launch_env):
    for variable, value in {"RANK": "8", "LOCAL_RANK": "0", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "GROUP_RANK": "1",
                            "MASTER_ADDR": "node01", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "abc"}.items():
        clean_launch_env.setenv(variable, value)
    trainer = two_nodes_of_eight()
    assert isinstance(trainer.strategy.cluster_environment, TorchElasticEnvironment)
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank) == (8, 0, 1)
    assert not is_primary()  # local rank 0 of node 1 is not the run's primary


def test_processes_of_one_launch_share_a_run_directory(clean_launch_env, tmp_path):
    assert is_primary() and launched_processes() == 1
    alone = shared_run_dir(tmp_path, "default", None, resume=False)
    assert alone.parent == tmp_path / "default" and alone.is_dir()

    clean_launch_env.setenv("WORLD_SIZE", "2")
    clean_launch_env.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun without --standalone or --rdzv-id
    with pytest.raises(RecipeError, match="run_dir=PATH"):
        shared_run_dir(tmp_path, "default", None, resume=False)
    clean_launch_env.setenv("TORCHELASTIC_RUN_ID", "f00d")
    for rank in ("0", "1"):
        clean_launch_env.setenv("RANK", rank)
        assert shared_run_dir(tmp_path, "default", None, resume=False) == tmp_path / "default" / "torchrun-f00d"
    clean_launch_env.setenv("SLURM_JOB_ID", "77")
    assert shared_run_dir(tmp_path, "default", None, resume=False) == tmp_path / "default" / "slurm-77"

    # Processes Lightning launches itself inherit the primary's choice.
    for variable in ("RANK", "WORLD_SIZE", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        clean_launch_env.delenv(variable)
    clean_launch_env.setenv(RUN_DIR_VARIABLE, str(alone))
    clean_launch_env.setenv("LOCAL_RANK", "1")
    assert shared_run_dir(tmp_path, "default", None, resume=False) == alone


def test_an_explicit_run_dir_never_overwrites_a_run(clean_launch_env, tmp_path):
    (tmp_path / "recipe.yaml").write_text("name: default\n")
    with pytest.raises(RecipeError, match="resume="):
        shared_run_dir("runs", "default", tmp_path, resume=False)
    assert shared_run_dir("runs", "default", tmp_path, resume=True) == tmp_path


def test_torchrun_launch_trains_one_run(tmp_path):
    """The README's torchrun command, on 2 CPU processes: one run directory, written by rank 0."""
    overrides = [*TINY_OVERRIDES, *STAGE_STEPS["generation"], "trainer=ddp", "trainer.devices=2", f"run_root={tmp_path}"]
    process = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "unizoo.cli", "train", *overrides],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert process.returncode == 0, process.stderr[-4000:]
    (run_dir,) = (tmp_path / "default").iterdir()  # not one per process
    assert run_dir.name.startswith("torchrun-")
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in process.stderr and "GLOBAL_RANK: 1, MEMBER: 2/2" in process.stderr
    assert process.stdout.split().count(str(run_dir)) == 2  # both processes report the same directory
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"untrained", "generation"} <= metrics.keys()
    assert (run_dir / "checkpoints" / "generation.ckpt").is_file() and (run_dir / "tokenizer").is_dir()


def test_the_shared_run_dir_variable_is_put_back(clean_launch_env, tmp_path):
    import os

    from unizoo.training.launch import share_run_dir

    restore = share_run_dir(tmp_path / "a")
    assert os.environ[RUN_DIR_VARIABLE] == str(tmp_path / "a")
    restore()
    assert RUN_DIR_VARIABLE not in os.environ
    clean_launch_env.setenv(RUN_DIR_VARIABLE, "outer")
    share_run_dir(tmp_path / "b")()
    assert os.environ[RUN_DIR_VARIABLE] == "outer"
