"""The training step never waits for the device: no tensor is read on the host between logging steps.

On a GPU, reading a tensor on the host (`.item()`, `float(t)`, `bool(t)`, ...) makes the CPU wait
until the device has finished everything queued, so a small model is held to the speed of Python.
Here every such read is counted during a real stage (the default recipe's generation stage at
tiny size, with every callback `unizoo train` uses); the steps where the loop is *meant* to read
(the loss log every `trainer.log_every_n_steps`, checkpoints, validation) are the only ones with reads.
"""

from __future__ import annotations

from collections import defaultdict

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from conftest import TINY_OVERRIDES
from unizoo.config.composition import compose_recipe
from unizoo.runtime.fabric import loops_on
from unizoo.training.build import build_model
from unizoo.training.run_loggers import logger_factory
from unizoo.training.stage_callbacks import stage_trainer

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
EVERY = 5  # logging, checkpoints and validation every 5 steps


class ReadsPerStep(L.Callback):
    """Counts host reads from the start of one training batch to the start of the next."""

    def __init__(self, counter: list[int]) -> None:
        self.counter, self.per_step, self.step = counter, defaultdict(int), None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.step is not None:
            self.per_step[self.step] += self.counter[0]
        self.counter[0], self.step = 0, trainer.global_step + 1  # the optimiser step this batch makes

    def on_train_end(self, trainer, pl_module) -> None:
        self.per_step[self.step] += self.counter[0]


@pytest.fixture
def counted_reads(monkeypatch):
    counter = [0]
    for name in READS:
        original = getattr(torch.Tensor, name)

        def wrapped(self, *args, _original=original, **kwargs):
            counter[0] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    return counter


def test_no_host_reads_between_logging_steps(counted_reads, tmp_path):
    recipe = compose_recipe("default", [*TINY_OVERRIDES, f"run_root={tmp_path}", "strategy.steps=12",
                                        f"trainer.log_every_n_steps={EVERY}", f"trainer.val_check_interval={EVERY}",
                                        f"checkpoint.every_n_steps={EVERY}"])
    assert recipe.optimizer.fused is True  # the default optimiser skips a non-finite step on the device
    with loops_on(recipe.trainer.accelerator, recipe.trainer.precision):
        model = build_model(recipe)
        (stage,) = instantiate(recipe.strategy).stages
        model.set_stage(stage)
        reads = ReadsPerStep(counted_reads)
        trainer = stage_trainer(recipe, stage, [stage], tmp_path, logger_factory(recipe)(tmp_path, stage.name), [reads])
        trainer.fit(model, datamodule=instantiate(recipe.data, _convert_="all"))
    steps = dict(reads.per_step)
    assert sorted(steps) == list(range(1, 13))
    # Reads are expected at steps 5 and 10 (loss log, checkpoint, validation) and at the stage's end (12:
    # the non-finite guard's last look); every other step must make none.
    quiet = {step: count for step, count in steps.items() if step % EVERY and step != 12}
    assert quiet and all(count == 0 for count in quiet.values()), sorted(steps.items())
    assert steps[EVERY] > 0  # the loss log is read at its steps: the counter sees reads where they happen
