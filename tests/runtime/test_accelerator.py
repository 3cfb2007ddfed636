"""The run's accelerator: what auto becomes, what a GPU run turns on, and settings refused before any work."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.accelerators import CPUAccelerator

from unizoo.config.composition import compose_recipe
from unizoo.errors import RecipeError
from unizoo.runtime import accelerator as accel
from unizoo.runtime.fabric import loops_on


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_the_default_trainer_takes_the_cpu_where_there_is_no_gpu():
    recipe = compose_recipe("default")
    assert recipe.trainer.accelerator == "auto"
    trainer = instantiate(recipe.trainer, max_steps=1, logger=False, enable_checkpointing=False)
    assert isinstance(trainer.accelerator, CPUAccelerator)
    assert accel.describe_accelerator("auto") == "accelerator auto -> cpu (no CUDA GPU)"
    assert compose_recipe("default", ["trainer=cpu"]).trainer.accelerator == "cpu"


@pytest.mark.parametrize(("accelerator", "devices", "message"), [
    ("tpu9", 1, "trainer.accelerator='tpu9' is not an accelerator unizoo runs on; valid choices: auto, cpu, gpu, cuda, mps"),
    ("cpu", 0, "trainer.devices=0: expected a number of devices of at least 1"),
    ("cpu", -2, "trainer.devices=-2: expected a number of devices of at least 1"),
])
def test_settings_that_cannot_work_are_named(accelerator, devices, message):
    with pytest.raises(RecipeError) as refused:
        accel.check_trainer_settings(accelerator, devices)
    assert str(refused.value).startswith(message)


def test_settings_that_work_pass():
    for devices in (1, 2, -1, "auto", [0], "0,1"):
        accel.check_trainer_settings("cpu", devices)
    accel.check_trainer_settings("auto", 1)


def test_a_gpu_that_is_not_there_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RecipeError) as refused:
        accel.check_trainer_settings("gpu", 1)
    message = str(refused.value)
    assert message.startswith("trainer.accelerator=gpu but this machine has no CUDA GPU that torch ")
    assert message.endswith("Use trainer.accelerator=auto (the GPU where there is one, else the CPU) or trainer.accelerator=cpu.")


def test_loader_workers_none_on_the_cpu_some_with_pinned_memory_on_a_gpu(monkeypatch):
    with loops_on("cpu"):
        assert accel.loader_options("auto") == {"num_workers": 0, "persistent_workers": False, "pin_memory": False}
        assert accel.loader_options(3) == {"num_workers": 3, "persistent_workers": True, "pin_memory": False}
    monkeypatch.setattr(accel, "loop_device", lambda accelerator=None: torch.device("cuda", 0))
    monkeypatch.setattr(accel.os, "cpu_count", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert accel.loader_options("auto") == {"num_workers": 8, "persistent_workers": True, "pin_memory": True}
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four GPU processes on the machine share its cores
    assert accel.loader_options("auto")["num_workers"] == 3


def test_tf32_only_for_fp32_on_cuda(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", chosen.append)
    with loops_on("cpu"):
        assert accel.use_tensor_cores("32-true") is None
    monkeypatch.setattr(accel, "loop_device", lambda accelerator=None: torch.device("cuda", 0))
    assert accel.use_tensor_cores("bf16-mixed") is None and chosen == []
    assert accel.use_tensor_cores("32-true").startswith("fp32 matrix products in TF32")
    assert chosen == ["high"]


def test_the_shapes_training_loader_follows_num_workers_auto():
    from unizoo.data.datamodule import ShapesDataModule

    data = ShapesDataModule(train_size=32, val_size=8, batch_size=4)
    data.trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with loops_on("cpu"):
        loader = data.train_dataloader()
    assert data.num_workers == "auto" and loader.num_workers == 0 and loader.pin_memory is False
    assert data.val_dataloader().num_workers == 0  # the val split is read a few items at a time: never through workers
