"""The model summary a stage logs when it starts: its modules, their parameters and what of them trains.

It replaces Lightning's ``ModelSummary``, which is wrong twice for a unified model:

* Lightning 2.6 counts FLOPs only by running the module's ``example_input_array``; a unified
  model's batch (images, captions, stage-dependent keys) has none, so every run printed a FLOPs
  column of zeros and "Total FLOPs: 0", which a reader of the log takes for a measurement. The
  FLOPs of a training step are counted where they mean something: ``python -m benchmarks.run
  loop`` and ``variants`` (for MFU).
* Under ``bf16-mixed`` it warns that the model's size "will not be accurate"; the weights are
  fp32 under mixed precision, and the size here is the bytes the parameters really take.

It also says which parameters the stage trains, per module: a frozen representation or a
backbone frozen by ``sequential`` shows 0 there. The table goes through logging, so it lands in
the run's ``train.log`` as well as on the console, and only the first process writes it.
"""

from __future__ import annotations

import logging

import lightning as L
from torch import nn

log = logging.getLogger(__name__)


class ParameterSummary(L.Callback):
    """Logs the LightningModule's top-level modules (name, type, parameters, trainable, mode) when `stage` starts."""

    def __init__(self, stage: str) -> None:
        self.stage = stage

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            log.info("model summary, stage %s:\n%s", self.stage, parameter_table(pl_module))


def parameter_table(model: nn.Module) -> str:
    """A plain-text table of `model`'s children, and the totals (it reads the same on a terminal and in a file)."""
    header = ("Name", "Type", "Params", "Trainable", "Mode")
    rows = [
        (name, type(child).__name__, readable_count(parameter_count(child)), readable_count(parameter_count(child, trainable=True)),
         "train" if child.training else "eval")
        for name, child in model.named_children()
    ]
    widths = [max(len(cells[column]) for cells in (header, *rows)) for column in range(len(header))]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip() for cells in (header, *rows)]
    lines.insert(1, "-" * max(len(line) for line in lines))
    trainable, total = parameter_count(model, trainable=True), parameter_count(model)
    size_mb = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters()) / 1e6
    lines.append(f"{readable_count(trainable)} trainable params, {readable_count(total - trainable)} frozen, "
                 f"{readable_count(total)} in all ({size_mb:,.1f} MB of weights)")
    return "\n".join(lines)


def parameter_count(module: nn.Module, trainable: bool = False) -> int:
    """Parameters of `module` (a tensor shared by two submodules once); only those with ``requires_grad`` when `trainable`."""
    return sum(parameter.numel() for parameter in module.parameters() if parameter.requires_grad or not trainable)


def readable_count(number: int) -> str:
    """1234 -> "1.2 K", as Lightning's summary writes counts."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if number >= scale:
            return f"{number / scale:.1f} {unit}"
    return str(number)
