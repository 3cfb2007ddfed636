"""What a run that starts at a later stage (`start_stage`) takes from `init_checkpoint`.

The skipped stages' work must arrive exactly, so the groups they trained load strictly.
A group that none of them trained (sequential's generator and queries, before stage 2)
holds nothing but its initialisation in that checkpoint. A stage-2 recipe may therefore
change its shape (`generator.size=S`, more queries) and still start from one stage-1
run: tensors of such a group that are new or reshaped keep this run's initialisation,
and those that match are loaded, so an unchanged recipe starts exactly as before.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn as nn

from unizoo.training.ema import ATTRIBUTE as EMA_ATTRIBUTE

log = logging.getLogger(__name__)


def groups_only_later_stages_train(all_stages: Sequence, stages_to_run: Sequence) -> set[str]:
    """Parameter groups the stages to run train and the skipped (earlier) stages never did.

    Empty when no stage is skipped: a checkpoint to continue from then loads strictly.
    """
    skipped = all_stages[: len(all_stages) - len(stages_to_run)]
    if not skipped:
        return set()
    trained_before = {group for stage in skipped for group in stage.trainable}
    return {group for stage in stages_to_run for group in stage.trainable} - trained_before


def _untrained_key(model: nn.Module, groups: set[str]):
    """`is_untrained(state key)`: the key belongs to one of `groups` (or to the EMA copy of one)."""
    ids = {id(p) for name, params in model.parameter_groups().items() if name in groups for p in params}
    parameters = {name for name, p in model.named_parameters() if id(p) in ids}
    # A submodule whose every parameter is in the groups is theirs whole, under any of its
    # names, including names only the checkpoint has (a deeper generator's extra blocks).
    modules = tuple(
        f"{name}."
        for name, child in model.named_children()
        if name != EMA_ATTRIBUTE and (own := list(child.parameters())) and all(id(p) in ids for p in own)
    )

    def is_untrained(key: str) -> bool:
        if key.startswith(f"{EMA_ATTRIBUTE}."):  # the average of the generator follows the generator
            return "generator." in modules
        return key in parameters or key.startswith(modules)

    return is_untrained


def state_for_later_stages(model: nn.Module, state: dict[str, torch.Tensor], groups: set[str]) -> dict[str, torch.Tensor]:
    """`state` with this model's own tensors wherever a tensor of `groups` is new or reshaped.

    Only tensors of `groups` are ever replaced or dropped; everything else is left for a
    strict load to check. Logs what started fresh.
    """
    if not groups:
        return state
    is_untrained = _untrained_key(model, groups)
    own = model.state_dict()
    usable = {key for key, value in state.items() if key in own and own[key].shape == value.shape}
    kept = {key: value for key, value in state.items() if not is_untrained(key) or key in usable}
    fresh = [key for key in own if is_untrained(key) and key not in kept]
    kept.update({key: own[key] for key in fresh})
    dropped = [key for key in state if key not in kept]
    named = [key for key in fresh if not key.startswith(f"{EMA_ATTRIBUTE}.")]  # the EMA copy follows its generator
    if named or dropped:
        log.info(
            "init_checkpoint: %d tensors of %s are new or reshaped in this recipe and start from this run's "
            "initialisation, %d of the checkpoint's are not used (no skipped stage trained them): %s%s",
            len(named), ", ".join(sorted(groups)), len(dropped), ", ".join(named[:4]), " ..." if len(named) > 4 else "",
        )
    return kept
