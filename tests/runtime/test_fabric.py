"""Pretraining runs through a Lightning Fabric on the run's device and in the precision asked for."""

from __future__ import annotations

import logging

import lightning.fabric
import pytest
import torch
from diffusers import AutoencoderKL
from torch.utils.data import DataLoader

from unizoo.pretraining import autoencoder
import unizoo.runtime.fabric as fabric_module
from unizoo.runtime.fabric import loop_device, loop_fabric, loop_precision, loops_on, placement

TINY_VAE = dict(block_out_channels=[16, 16], latent_channels=4, layers_per_block=1, norm_num_groups=8,
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)


def test_loops_follow_the_run_and_come_back():
    assert placement() == fabric_module.Placement()  # outside a run: auto, fp32
    with loops_on("cpu", "bf16-mixed"):
        assert loop_device() == torch.device("cpu")
        assert loop_precision("auto") == "bf16-mixed" and loop_precision("32-true") == "32-true"
        fabric = loop_fabric("auto")
        assert fabric.device == torch.device("cpu") and type(fabric.strategy.precision).__name__ == "MixedPrecision"
    assert placement() == fabric_module.Placement()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_a_gpu_accelerator_without_a_gpu_is_named():
    with loops_on("gpu"), pytest.raises(RuntimeError, match="trainer.accelerator=gpu but this machine has no such device"):
        loop_device()


def test_a_device_with_its_index_is_that_device(monkeypatch):
    # `unizoo cache-targets --device cuda:1` and a GPU study's memory estimate name the GPU; LOCAL_RANK would say cuda:0.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "0")
    with loops_on("cuda:1"):
        assert loop_device() == torch.device("cuda", 1)
    assert loop_device("cuda") == torch.device("cuda", 0) and loop_device("cpu") == torch.device("cpu")
    with pytest.raises(RuntimeError, match=r"^cuda:2 but this machine has 2 CUDA GPU\(s\); valid: auto, cpu, cuda:0, cuda:1$"):
        loop_device("cuda:2")


def test_vae_pretraining_takes_the_run_s_device_and_precision(monkeypatch, caplog):
    made = []
    real = lightning.fabric.Fabric  # loop_fabric imports it when called (recipe composition stays light)

    def recording(**kwargs):
        made.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(lightning.fabric, "Fabric", recording)
    images = torch.rand(16, 3, 16, 16) * 2 - 1
    loader = DataLoader([{"image": image} for image in images], batch_size=8)
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE)
    with loops_on("cpu", "bf16-mixed"), caplog.at_level(logging.INFO, logger="unizoo.pretraining.autoencoder"):
        autoencoder.train_autoencoder(vae, loader, steps=2, precision="auto")
    (kwargs,) = made
    assert kwargs["accelerator"] == "cpu" and kwargs["precision"] == "bf16-mixed"
    assert kwargs["strategy"].root_device == torch.device("cpu")
    assert "VAE pretrained for 2 steps of 8 images (bf16-mixed) on cpu" in caplog.text
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in vae.parameters())  # a device-free cache entry


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_pretraining_in_a_file_prints_plain_lines_not_a_bar(capsys, monkeypatch):
    from unizoo.runtime.progress import LoopProgress

    logger = logging.getLogger("unizoo")  # the CLI stops its propagation: listen on it directly
    handler = _Lines()
    logger.addHandler(handler)
    monkeypatch.setattr(logger, "level", logging.INFO)
    progress = LoopProgress("pretraining VAE (cpu, 32-true)", total=3, interval=0.0)  # stderr is captured: not a terminal
    reads = []
    try:
        for _ in range(3):
            progress.step(lambda: reads.append(1) or {"loss": 0.5})
        progress.close({"loss": 0.25})
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert "\r" not in err and "it/s" not in err  # no bar drawn: tqdm would redraw it with carriage returns
    lines = handler.lines
    assert lines[0].startswith("pretraining VAE (cpu, 32-true): step 1/3 (33%), loss 0.5, ")
    assert lines[-1].startswith("pretraining VAE (cpu, 32-true): step 3/3 (100%), loss 0.25, ") and " done in " in lines[-1]
    assert len(reads) == 3  # read once per line written


def test_losses_are_read_only_when_a_line_is_due(caplog):
    from unizoo.runtime.progress import LoopProgress

    progress = LoopProgress("pretraining CLIP", total=100, interval=3600.0)
    reads = []
    for _ in range(100):
        progress.step(lambda: reads.append(1) or {"loss": 1.0})
    assert reads == []  # no line was due: no value was read (on a GPU, no wait for the device)


class _Moves(torch.nn.Module):
    """A module that records where it is asked to go and stays where it is (no second device on this machine)."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2, device=device))
        self.moves: list[torch.device] = []

    def to(self, device):
        self.moves.append(torch.device(device))
        return self


def test_on_loop_device_puts_each_module_back_where_it_was(monkeypatch):
    # A frozen encoder waits on the CPU between uses; the model a mid-stage evaluation samples with is on the
    # training device (here "meta" stands for it), and must be left there for Lightning's next step.
    monkeypatch.setattr(fabric_module, "loop_device", lambda: torch.device("cuda", 0))
    encoder, training_model = _Moves("cpu"), _Moves("meta")
    with fabric_module.on_loop_device(encoder, training_model) as device:
        assert device == torch.device("cuda", 0)
    assert encoder.moves == [torch.device("cuda", 0), torch.device("cpu")]
    assert training_model.moves == [torch.device("cuda", 0), torch.device("meta")]
    assert fabric_module.home_device(torch.nn.ReLU()) == torch.device("cpu")  # nothing to place: the CPU

