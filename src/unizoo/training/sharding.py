"""Fully sharded data parallelism (`trainer=fsdp`): torch's FSDP2 `fully_shard` under Lightning's `ModelParallelStrategy`.

The model cuts itself into units in its `configure_model` hook (`unizoo.model.shard`):
each block of a layer stack inside the generator and the backbone becomes one unit,
all-gathered only while it computes; the EMA is a unit of its own that is never gathered
(its update works shard by shard); everything else is the root unit. This module holds
what the training loop needs around it: the strategy, and the copy each stage fits.

A sharded model cannot be evaluated or sampled by one process alone, so each stage fits
a copy (`model_to_fit`) and its trained weights come back to the unsharded model
(`take_trained_weights`), on every process, before the next stage or evaluation.
"""

from __future__ import annotations

import copy

import lightning as L
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict


class FullyShardedStrategy(ModelParallelStrategy):
    """`ModelParallelStrategy` sharding over every process (data-parallel size = world size, no tensor parallelism).

    Lightning's own "auto" would make the data-parallel size the number of nodes and
    tensor-parallelise within each, which needs a plan unizoo's components do not have.
    """

    def __init__(self, save_distributed_checkpoint: bool = True, **kwargs) -> None:
        # Named, not left in **kwargs, so the recipe type check sees what the value must be.
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def is_sharding(trainer: L.Trainer) -> bool:
    return isinstance(trainer.strategy, ModelParallelStrategy)


def model_to_fit(model: L.LightningModule, trainer: L.Trainer) -> L.LightningModule:
    """What `trainer.fit` should train: `model`, or a copy of it when the trainer will shard it."""
    return copy.deepcopy(model) if is_sharding(trainer) else model


def take_trained_weights(model: L.LightningModule, fitted: L.LightningModule) -> None:
    """Gather a sharded copy's weights (a collective: every process calls it) back into `model`."""
    if fitted is model:
        return
    state = get_model_state_dict(fitted, options=StateDictOptions(full_state_dict=True))
    model.load_state_dict({name: value.detach().cpu() for name, value in state.items()})
