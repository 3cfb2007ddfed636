"""The training step never waits for the device: no tensor is read on the host between logging steps.

On a GPU, reading a tensor on the host (`.item()`, `float(t)`, `bool(t)`, ...) makes the CPU wait
until the device has finished everything queued, so a small model is held to the speed of Python.
Here every such read is counted during a real stage (the default recipe's generation stage at
tiny size, with every callback `unizoo train` uses); the steps where the loop is *meant* to read
(the loss log every `trainer.log_every_n_steps`, checkpoints, validation) are the only ones with reads.

Reads are counted twice: the Python methods that read (what unizoo's own code would call), and the
operators that read, below Python (`aten::_local_scalar_dense` and the other operators whose output
size or value the host must know), which also sees reads inside libraries, such as transformers
deciding whether its sdpa mask may be dropped. The language model runs both ways a run uses: eager
attention (the CPU's choice) and sdpa (the GPU's). On a GPU, host-to-device copies wait too; the
cuda-marked test at the end runs the same stage there under `torch.cuda.set_sync_debug_mode`,
which sees those as well.
"""

from __future__ import annotations

from collections import defaultdict

import traceback
import warnings

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import TINY_OVERRIDES
from unizoo.config.composition import compose_recipe
from unizoo.runtime.fabric import loops_on
from unizoo.training.build import build_model
from unizoo.training.run_loggers import logger_factory
from unizoo.training.stage_callbacks import stage_trainer

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
# Operators whose result the host must read: a value, or an output size that depends on the values.
READING_OPERATORS = ("_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
                     "repeat_interleave")
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


class ReadingOperators(TorchDispatchMode):
    """Counts into `counter` the operators of `READING_OPERATORS` that run while it is on."""

    def __init__(self, counter: list[int]) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in READING_OPERATORS:
            self.counter[0] += 1
        return func(*args, **(kwargs or {}))


def train_counted(tmp_path, callback: L.Callback, overrides: list[str]) -> None:
    """The default recipe's generation stage at tiny size, 12 steps, logging every `EVERY`, with `callback`."""
    recipe = compose_recipe("default", [*TINY_OVERRIDES, f"run_root={tmp_path}", "strategy.steps=12",
                                        f"trainer.log_every_n_steps={EVERY}", f"trainer.val_check_interval={EVERY}",
                                        f"checkpoint.every_n_steps={EVERY}", *overrides])
    assert recipe.optimizer.fused is True  # the default optimiser skips a non-finite step on the device
    with loops_on(recipe.trainer.accelerator, recipe.trainer.precision):
        model = build_model(recipe)
        (stage,) = instantiate(recipe.strategy).stages
        model.set_stage(stage)
        trainer = stage_trainer(recipe, stage, [stage], tmp_path, logger_factory(recipe)(tmp_path, stage.name), [callback])
        trainer.fit(model, datamodule=instantiate(recipe.data, _convert_="all"))


def assert_quiet_between_logging_steps(steps: dict[int, int]) -> None:
    assert sorted(steps) == list(range(1, 13))
    # Reads are expected at steps 5 and 10 (loss log, checkpoint, validation) and at the stage's end (12:
    # the non-finite guard's last look); every other step must make none.
    quiet = {step: count for step, count in steps.items() if step % EVERY and step != 12}
    assert quiet and all(count == 0 for count in quiet.values()), sorted(steps.items())
    assert steps[EVERY] > 0  # the loss log is read at its steps: the counter sees reads where they happen


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_no_host_reads_between_logging_steps(counted_reads, attention, tmp_path):
    reads = ReadsPerStep(counted_reads)
    operators = [0]
    operator_reads = ReadsPerStep(operators)

    class Both(L.Callback):  # one callback: the two counters' windows are the same steps
        def on_train_batch_start(self, *args) -> None:
            reads.on_train_batch_start(*args)
            operator_reads.on_train_batch_start(*args)

        def on_train_end(self, *args) -> None:
            reads.on_train_end(*args)
            operator_reads.on_train_end(*args)

    with ReadingOperators(operators):
        train_counted(tmp_path, Both(), [f"backbone.attn_implementation={attention}"])
    assert_quiet_between_logging_steps(dict(reads.per_step))
    assert_quiet_between_logging_steps(dict(operator_reads.per_step))


class SyncsPerStep(L.Callback):
    """On CUDA: where `torch.cuda.set_sync_debug_mode("warn")` reports a wait, per optimiser step."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.steps: set[int] = set()
        self.sites: dict[int, list[str]] = defaultdict(list)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.step = trainer.global_step + 1
        self.steps.add(self.step)

    def record(self, message, category, filename, lineno, *rest) -> None:
        """`warnings.showwarning`: the warning names a C++ file, so the Python frames that called it are kept."""
        if "synchroniz" in str(message) and self.step is not None:
            frames = [frame for frame in traceback.extract_stack()[:-1] if "/torch/" not in frame.filename
                      and not frame.filename.endswith("warnings.py")]
            self.sites[self.step].append(" <- ".join(f"{frame.filename}:{frame.lineno}" for frame in frames[-3:][::-1]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_device_waits_between_logging_steps_on_cuda(tmp_path):
    # Eager (compile=false): what a run does until its modules compile, and where a failed compile leaves it.
    syncs = SyncsPerStep()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():  # restores showwarning on the way out
            warnings.simplefilter("always")
            warnings.showwarning = syncs.record
            train_counted(tmp_path, syncs, ["trainer.accelerator=gpu", "compile=false"])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sorted(syncs.steps) == list(range(1, 13))
    # Step 1 does once what no later step does: where xformers can run, attention=auto probes its kernel against
    # sdpa there (a forward and backward, read back to compare). Every later step between logging steps is quiet.
    quiet = {step: syncs.sites[step] for step in syncs.steps if step % EVERY and step not in (1, 12)}
    assert quiet and not any(quiet.values()), {step: sites for step, sites in quiet.items() if sites}
    assert syncs.sites[EVERY]  # the loss log waits at its steps: the mode sees waits where they happen
