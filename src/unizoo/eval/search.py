"""Inference-time search over initial noises with a verifier (Ma et al., arXiv 2501.09732).

A sampler maps an initial noise to an image deterministically (the Euler flow sampler does),
so which noise it starts from decides the image. Search spends more sampler runs per prompt
to find a better noise, as judged by a verifier (``unizoo.eval.verifiers``):

* ``random``: best of ``budget`` independent noises (the paper's random search). Candidate 0
  is the noise plain sampling starts from, so a budget of 1 *is* plain sampling.
* ``zero_order``: the paper's zero-order search, a hill climb in noise space. Candidate 0 is
  plain sampling's noise, the first pivot; each round draws ``neighbours`` candidates around
  the pivot, ``sqrt(1 - step^2) * pivot + step * eps`` with ``eps ~ N(0, I)`` (each candidate is
  again a standard Gaussian: the sampler never sees noise off its training distribution), and
  the next round's pivot is the best noise seen so far, so a round that finds nothing better
  keeps the pivot. A budget of 1 is plain sampling here too.

Every prompt searches on its own (its own pivot, its own best), all prompts batched in each
sampler run. The result after a budget of b candidates is the best image among the first b;
a run with budget B also records that for any smaller b (``record``), and it is the same as a
run of budget b (the noises drawn do not depend on the budget), so one run gives a whole
score-against-compute curve. Compute is counted, not assumed: the generator's function
evaluations per prompt (NFE: rows through ``model.generator``, so classifier-free guidance
counts twice), per candidate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from unizoo.errors import UsageError
from unizoo.eval.verifiers import Verifier
from unizoo.model import UnifiedModel

METHODS = ("random", "zero_order")
# Candidates after the first come from a generator seeded seed + SEARCH_STREAM: a stream plain
# sampling (seeds 0, 1, ...) never draws, so no candidate repeats another evaluation's noise.
SEARCH_STREAM = 2**31


@dataclass
class SearchResult:
    """The best image per prompt after the budget, and after each recorded smaller budget."""

    images: torch.Tensor  # (n, 3, H, W): each prompt's best candidate
    scores: torch.Tensor  # (n,): the verifier's score of it
    chosen: torch.Tensor  # (n,): which candidate it was (0: plain sampling's noise)
    candidate_scores: torch.Tensor  # (budget, n): the verifier's score of every candidate
    nfe_per_candidate: float  # generator function evaluations per prompt for one candidate
    recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # b -> (images, scores) after b candidates

    @property
    def budget(self) -> int:
        return self.candidate_scores.shape[0]

    def nfe(self, budget: int | None = None) -> float:
        """Function evaluations per prompt spent on ``budget`` candidates (all of them by default)."""
        return (self.budget if budget is None else budget) * self.nfe_per_candidate


def check_search(method: str, budget: int, step: float = 0.5, neighbours: int = 2) -> None:
    """A search's settings, each refused with the valid range named (``evaluation.search.*`` or the command line)."""
    if method not in METHODS:
        raise UsageError(f"search method {method!r}; valid methods: {', '.join(METHODS)}")
    if not isinstance(budget, int) or budget < 1:
        raise UsageError(f"search budget {budget!r}: expected a whole number of candidates per prompt, at least 1")
    if not 0.0 < step <= 1.0:
        raise UsageError(f"search step {step!r}: expected the neighbourhood size in (0, 1] (1: a fresh noise)")
    if not isinstance(neighbours, int) or neighbours < 1:
        raise UsageError(f"search neighbours {neighbours!r}: expected candidates per zero-order round, at least 1")


class _CountRows:
    """Counts the rows the generator processes (a forward hook): its function evaluations."""

    def __init__(self, generator: torch.nn.Module) -> None:
        self.rows = 0
        self.handle = generator.register_forward_hook(self)

    def __call__(self, module, args, output) -> None:
        self.rows += args[0].shape[0]


@torch.no_grad()
def search(
    model: UnifiedModel,
    prompts: Sequence[str],
    verifier: Verifier,
    method: str = "random",
    budget: int = 8,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    step: float = 0.5,
    neighbours: int = 2,
    batch_size: int = 64,
    record: Iterable[int] = (),
) -> SearchResult:
    """Search ``budget`` initial noises per prompt with ``verifier``; ``steps``, ``guidance``, ``seed`` as ``model.generate``.

    ``record``: smaller budgets whose best images and scores to keep as well (``SearchResult.recorded``).
    """
    check_search(method, budget, step, neighbours)
    prompts = list(prompts)
    record = {b for b in record if 1 <= b <= budget} | {budget}
    counter = _CountRows(model.generator)
    try:
        best_noise = model.initial_noise(len(prompts), seed, batch_size)  # candidate 0: plain sampling's noise
        best_images = model.generate(prompts, steps, guidance, seed, batch_size, noise=best_noise)
        nfe_per_candidate = counter.rows / len(prompts)
        best_scores = verifier(prompts, best_images).float()
        chosen = torch.zeros(len(prompts), dtype=torch.long)
        history = [best_scores.clone()]
        recorded = {1: (best_images.clone(), best_scores.clone())} if 1 in record else {}
        rng = torch.Generator().manual_seed(seed + SEARCH_STREAM)
        pivot = best_noise
        keep = math.sqrt(1.0 - step**2)
        for candidate in range(1, budget):
            fresh = torch.randn(best_noise.shape, generator=rng)
            if method == "random":
                noise = fresh
            else:
                if (candidate - 1) % neighbours == 0:  # a new round starts from the best noise seen so far
                    pivot = best_noise
                noise = keep * pivot + step * fresh
            images = model.generate(prompts, steps, guidance, seed, batch_size, noise=noise)
            scores = verifier(prompts, images).float()
            history.append(scores)
            better = scores > best_scores  # ties keep the earlier candidate: budget 1 stays plain sampling
            best_images[better], best_scores[better] = images[better], scores[better]
            best_noise = torch.where(better.view(-1, 1, 1), noise, best_noise)
            chosen[better] = candidate
            if candidate + 1 in record:
                recorded[candidate + 1] = (best_images.clone(), best_scores.clone())
    finally:
        counter.handle.remove()
    return SearchResult(best_images, best_scores, chosen, torch.stack(history), nfe_per_candidate, recorded)
