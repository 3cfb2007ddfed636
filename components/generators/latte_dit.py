"""LaTtE: layerwise timestep experts (Shen, Xu et al., "LaTtE-Flow", arXiv 2506.06952).

The DiT's blocks form G consecutive groups of ``depth / G`` blocks. Group k is trained on,
and used for, one range of noise levels: sigma in ``[b_k, b_{k+1})`` (``b_0 = 0``,
``b_G = 1`` included), equal intervals ``k / G`` unless ``boundaries`` says otherwise. A
call runs the embedders, the group of each sample's sigma, and the final layer: one
sampling step (every sample at the same sigma) runs one group only, ``depth / G`` blocks
instead of ``depth``, which is where LaTtE's faster sampling comes from. The parameters
are the plain DiT's of the same depth and width exactly (the same modules; ``groups=1``
*is* the DiT).

Training routes per sample: the objective draws each sample's sigma as it does for any
generator, and the batch is split by group, each part running its group's blocks (then
put back in order). So every objective works unchanged, each sample trains the group of
its own noise level, and the timestep distribution each group sees is the objective's
restricted to its interval. (All samples of a batch could instead share one group drawn
per step; that changes the objective's sigma distribution per batch and its gradient
noise, and needs the objective to know about groups.) While gradients are recorded every
group runs, on zero samples if none fell in its range, so every parameter takes part in
every step (data-parallel training needs that); without gradients (sampling) a group with
no sample is skipped.

What LaTtE-Flow adds that this does not: its timestep-conditioned residual attention
(attention maps reused across layers), and building the groups out of a VLM's layers.
The blocks, embedders and final layer are :mod:`.dit`'s, unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .dit import DIT_SIZES, DiT


def group_boundaries(groups: int, boundaries: Sequence[float] | None) -> list[float]:
    """The G - 1 inner boundaries: ``k / G`` for None, else ``boundaries`` checked (increasing, in (0, 1))."""
    if boundaries is None:
        return [k / groups for k in range(1, groups)]
    inner = [float(b) for b in boundaries]
    if len(inner) != groups - 1 or any(not 0.0 < b < 1.0 for b in inner) or inner != sorted(set(inner)):
        raise ValueError(
            f"generator.boundaries={list(boundaries)!r}: expected {groups - 1} increasing noise levels in (0, 1) "
            f"between the {groups} groups (or null for equal intervals k/{groups})"
        )
    return inner


class LatteDiT(DiT):
    """A :class:`DiT` whose blocks are G timestep experts; ``forward(x, t, cond)`` as the DiT's, ``t`` = sigma in [0, 1].

    Args:
        groups: G, the number of block groups; must divide ``depth``.
        boundaries: the G - 1 noise levels between groups (None: ``k / G``).
        **dit_arguments: the DiT's (sizes, attention backend, adaLN mode, ...).
    """

    def __init__(self, *args, groups: int = 2, boundaries: Sequence[float] | None = None, **dit_arguments) -> None:
        super().__init__(*args, **dit_arguments)
        if groups < 1 or self.depth % groups:
            divisors = [g for g in range(1, self.depth + 1) if self.depth % g == 0]
            raise ValueError(
                f"generator.groups={groups}: the {self.depth} blocks must split into equal groups; "
                f"valid choices at depth {self.depth}: {', '.join(map(str, divisors))}"
            )
        self.groups = groups
        self.register_buffer("boundaries", torch.tensor(group_boundaries(groups, boundaries)), persistent=False)
        size = self.depth // groups
        self.group_blocks = [range(k * size, (k + 1) * size) for k in range(groups)]

    def group_of(self, t: torch.Tensor) -> torch.Tensor:
        """The group of each noise level ``t (B,)``: k where ``b_k <= t < b_{k+1}`` (t = 1 in the last)."""
        return torch.bucketize(t.float(), self.boundaries.to(t.device), right=True)

    def forward(self, x, t, cond, cond_mask=None):
        """Predict ``(B, N, C)``; each sample runs the blocks of its noise level's group only."""
        h, c, block_c, stacks, cond_mask = self.embed(x, t, cond, cond_mask)
        # Which blocks run depends on the noise levels: read once per call on the host (one
        # device sync on a GPU), then every group's rows are known without another.
        groups = self.group_of(t).tolist()
        for k, blocks in enumerate(self.group_blocks):
            rows = [row for row, group in enumerate(groups) if group == k]
            if len(rows) == len(groups):  # the whole batch (every sampling step): no gather, no scatter
                h = self.run_blocks(blocks, h, block_c, stacks, cond_mask)
                continue
            if not rows and not torch.is_grad_enabled():
                continue
            index = torch.tensor(rows, dtype=torch.long, device=h.device)
            part = self.run_blocks(
                blocks,
                h.index_select(0, index),
                block_c.index_select(0, index),
                stacks.index_select(0, index),
                None if cond_mask is None else cond_mask.index_select(0, index),
            )
            h = h.index_copy(0, index, part)
        return self.final_layer(h, c)


def latte_dit(size: str = "tiny", groups: int = 2, boundaries: Sequence[float] | None = None, **overrides) -> LatteDiT:
    """A LaTtE DiT from a preset in ``DIT_SIZES`` (keyword overrides win), its blocks in ``groups`` timestep experts."""
    if size not in DIT_SIZES:
        raise ValueError(f"unknown DiT size {size!r}; choose one of {list(DIT_SIZES)}")
    return LatteDiT(**{**DIT_SIZES[size], **overrides}, groups=groups, boundaries=boundaries)
