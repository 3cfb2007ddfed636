"""A stage logs its modules and parameters when it starts, without the FLOPs Lightning cannot count for a unified model."""

from __future__ import annotations

import logging

import lightning as L
import torch
from hydra.utils import instantiate
from torch import nn

from conftest import TINY_OVERRIDES
from unizoo.config.composition import compose_recipe
from unizoo.runtime.fabric import loops_on
from unizoo.training.build import build_model
from unizoo.training.model_summary import ParameterSummary, parameter_table, readable_count
from unizoo.training.run_loggers import logger_factory
from unizoo.training.stage_callbacks import stage_trainer

SUMMARY_ON = [override for override in TINY_OVERRIDES if "enable_model_summary" not in override]


def summaries(trainer: L.Trainer) -> list[L.Callback]:
    return [callback for callback in trainer.callbacks
            if isinstance(callback, (ParameterSummary, L.pytorch.callbacks.ModelSummary))]


def test_a_stage_logs_its_modules_what_trains_and_no_flops(tmp_path, caplog):
    recipe = compose_recipe("default", [*SUMMARY_ON, f"run_root={tmp_path}", "strategy.steps=1"])
    with loops_on(recipe.trainer.accelerator, recipe.trainer.precision):
        model = build_model(recipe)
        (stage,) = instantiate(recipe.strategy).stages
        model.set_stage(stage)
        trainer = stage_trainer(recipe, stage, [stage], tmp_path, logger_factory(recipe)(tmp_path, stage.name))
        assert [type(callback) for callback in summaries(trainer)] == [ParameterSummary]  # Lightning's own is not added
        with caplog.at_level(logging.INFO):
            trainer.fit(model, datamodule=instantiate(recipe.data, _convert_="all"))
    (table,) = [record.getMessage() for record in caplog.records if record.name == "unizoo.training.model_summary"]
    assert "FLOPs" not in table and "Flops" not in table
    assert not [record for record in caplog.records if "model summary" in record.getMessage() and record.name != "unizoo.training.model_summary"]
    lines = table.splitlines()
    assert lines[0] == "model summary, stage generation:"
    assert [cell.strip() for cell in lines[1].split("|")] == ["Name", "Type", "Params", "Trainable", "Mode"]
    rows = {cells[0]: cells[1:] for cells in ([cell.strip() for cell in line.split("|")] for line in lines[3:-1])}
    # The generation stage trains the backbone and the generator; the VAE and the EMA copy are frozen.
    vae_params = sum(p.numel() for p in model.representation.parameters())
    assert rows["representation"] == ["VAERepresentation", readable_count(vae_params), "0", "train"]
    generator_params = readable_count(sum(p.numel() for p in model.generator.parameters()))
    assert rows["generator"] == ["DiT", generator_params, generator_params, "train"]
    assert rows["generator_ema"][2] == "0"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert lines[-1] == (f"{readable_count(trainable)} trainable params, {readable_count(total - trainable)} frozen, "
                         f"{readable_count(total)} in all ({total * 4 / 1e6:,.1f} MB of weights)")  # fp32 weights


def test_shared_parameters_count_once_and_sizes_are_the_bytes_they_take():
    shared = nn.Linear(10, 10)  # 110 parameters
    model = nn.Module()
    model.encoder, model.decoder = shared, shared
    model.head = nn.Linear(1000, 1000).to(torch.bfloat16).requires_grad_(False)  # 1,001,000 parameters of 2 bytes
    table = parameter_table(model).splitlines()
    assert [line.split("|")[0].strip() for line in table[2:-1]] == ["encoder", "head"]  # a module shared is listed once
    assert table[-1] == "110 trainable params, 1.0 M frozen, 1.0 M in all (2.0 MB of weights)"
    assert [readable_count(n) for n in (999, 1_000, 1_234_567, 2_500_000_000)] == ["999", "1.0 K", "1.2 M", "2.5 B"]


def test_enable_model_summary_false_turns_it_off(tmp_path):
    recipe = compose_recipe("default", [*TINY_OVERRIDES, f"run_root={tmp_path}", "strategy.steps=1"])
    assert recipe.trainer.enable_model_summary is False
    (stage,) = instantiate(recipe.strategy).stages
    trainer = stage_trainer(recipe, stage, [stage], tmp_path, logger_factory(recipe)(tmp_path, stage.name))
    assert summaries(trainer) == []
