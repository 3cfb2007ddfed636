"""A generator's hidden states at one block, read from the forward passes that compute its loss.

REPA aligns what a block of the generator computes with an image encoder's features, so it
needs the block's output `(B, N, D)` from the very forward pass the objective runs, not a
second pass of its own (the noise, the timestep and the dropped conditions would differ, and
it would cost a forward). `capture_block_output` hooks the block for the duration of a
`with` and hands back what it saw. Any generator whose transformer blocks are an
`nn.ModuleList` named `blocks` works (the DiT; PixArt-like and SiT-like models are built the
same way); nothing in the generator changes, and outside the `with` no hook remains.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class BlockOutput:
    """The output of one generator block in the last forward pass inside `capture_block_output`."""

    def __init__(self, generator_name: str, block: int) -> None:
        self.description = f"block {block} of the {generator_name}"
        self._value: torch.Tensor | None = None

    def record(self, output: torch.Tensor) -> None:
        self._value = output

    @property
    def value(self) -> torch.Tensor:
        """`(B, N, D)`: the block's output tokens, with their graph (gradients reach the generator through them)."""
        if self._value is None:
            raise RuntimeError(f"{self.description} did not run inside the capture: the objective never called the generator")
        return self._value


def block_count(generator: nn.Module) -> int:
    """How many blocks `generator.blocks` holds (what `block` of `capture_block_output` counts)."""
    blocks = getattr(generator, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"{type(generator).__name__} has no `blocks` ModuleList, so its hidden states cannot be read block by block")
    return len(blocks)


@contextmanager
def capture_block_output(generator: nn.Module, block: int) -> Iterator[BlockOutput]:
    """Within the `with`, record the output of `generator.blocks[block - 1]` (blocks count from 1, as REPA's depth).

    Each forward pass overwrites the record, so it holds the last pass's output. With gradient
    checkpointing the block runs again during backward; that recomputation comes after the
    loss was read and changes nothing the caller used.
    """
    depth = block_count(generator)
    if not 1 <= block <= depth:
        raise ValueError(f"block {block} is not a block of this {depth}-block {type(generator).__name__}: choose 1..{depth}")
    captured = BlockOutput(type(generator).__name__, block)
    handle = generator.blocks[block - 1].register_forward_hook(lambda module, inputs, output: captured.record(output))
    try:
        yield captured
    finally:
        handle.remove()
