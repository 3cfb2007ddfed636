"""alignment=none: the generator's hidden states are left to the objective alone (the default).

The same interface as REPA (`components/alignments/repa.py`), doing nothing: no parameters,
nothing to prepare, no hook on the generator and no loss term, so the model adds the
alignment's terms without asking which alignment it holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class NoAlignment(nn.Module):
    """No auxiliary loss on the generator's hidden states."""

    def __init__(self, generator: nn.Module | None = None) -> None:
        """`generator`: accepted for the interface (`build_model` hands every alignment the generator) and unused."""
        super().__init__()

    def prepare(self, datamodule: Any) -> None:
        """Nothing to load or pretrain."""

    def head_parameters(self) -> list[nn.Parameter]:
        """What trains with the generator: nothing."""
        return []

    @contextmanager
    def capture(self, generator: nn.Module) -> Iterator[None]:
        """No hook: the generator runs exactly as without an alignment."""
        yield None

    def terms(self, captured: None, images: torch.Tensor) -> dict[str, tuple[torch.Tensor, float]]:
        """No loss term."""
        return {}

    def loss(self, captured: None, images: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            "alignment=none has no alignment loss, but a stage asked for one (REPA-E's representation_alignment "
            "trains the VAE through it): set alignment=repa (strategy=repa_e selects it unless overridden)"
        )
