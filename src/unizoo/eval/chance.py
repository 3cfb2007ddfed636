"""Chance levels: what the evaluator gives real images scored against other images' prompts.

That is the score of a perfect generator that ignores its prompt: it draws clean, in-distribution
scenes, just not the requested one. A score is only worth as much as its distance from this level.

The level is measured per run on the run's own data (the first ``CHANCE_IMAGES`` validation
images, each scored against ``CHANCE_SHUFFLES`` other prompts) with the run's own evaluator,
rather than looked up in a committed table: it takes a few seconds (1000 images at 32 px: 0.3 s
to draw, 5 x 0.4 s to score), so it is never stale when the detector, the scoring rules or the
scene sampler change, and it is right for any data recipe (image size, seed, split sizes)
without a cache to key and invalidate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

# Enough for a stable estimate. Measured on the default val split against the exact expectation
# over all 1000 x 999 mismatched pairs (single_object 0.457): one shuffle is off by up to 0.09
# (single_object 0.37-0.48 over shuffle seeds 0-3), five shuffles by at most 0.015 in any
# category (single_object 0.443) and by 0.001 in strict_overall (0.0061 vs 0.0067).
CHANCE_IMAGES = 1000
CHANCE_SHUFFLES = 5


def shuffled_prompts(prompts: Sequence[str], seed: int = 0) -> list[str]:
    """The prompts moved to other images: a random cycle through all of them, so none keeps its own.

    Deterministic in ``seed``. A plain permutation would leave about one image with its own
    prompt, which is not chance.
    """
    if len(prompts) < 2:
        raise ValueError(f"need at least 2 prompts to shuffle them onto other images, got {len(prompts)}")
    order = np.random.default_rng(seed).permutation(len(prompts))
    shuffled = [""] * len(prompts)
    for here, there in zip(order, np.roll(order, -1)):
        shuffled[here] = prompts[there]
    return shuffled


def chance_levels(
    evaluator: Callable[[list[str], Sequence], dict[str, float]],
    prompts: Sequence[str],
    images: torch.Tensor,
    shuffles: int = CHANCE_SHUFFLES,
) -> dict[str, float]:
    """The evaluator's scores for ``images`` against their prompts shuffled by ``shuffled_prompts``,
    with seeds ``0 .. shuffles - 1``, pooled (its ``n`` counts every scored pair)."""
    if len(prompts) != len(images):
        raise ValueError(f"got {len(prompts)} prompts but {len(images)} images")
    others = [p for seed in range(shuffles) for p in shuffled_prompts(prompts, seed)]
    return evaluator(others, [image for _ in range(shuffles) for image in images])


def format_scores(scores: Mapping[str, float], chance: Mapping[str, float] | None = None) -> str:
    """``"single_object 0.812 (chance 0.439), ..."``: every float score, with its chance level where known."""
    chance = chance or {}
    return ", ".join(
        f"{name} {value:.3f}" + (f" (chance {chance[name]:.3f})" if name in chance else "")
        for name, value in scores.items()
        if isinstance(value, float)
    )
