"""``evaluation.search``: a run's evaluations also score samples found by a search over initial noises.

Off by default (``evaluation.search.method: null``): evaluations are then what they were. On,
every full evaluation (before training and after each stage, not the curve's points) runs the
search (``unizoo.eval.search``) on the evaluation's prompts with the EMA weights, scores the
chosen images with the run's evaluator, and writes them to ``metrics.json`` under ``search``
beside ``generation``, with the compute spent (``nfe``: generator evaluations per prompt) and
the verifier's mean score of the chosen images and of plain sampling's. A study reports them
as ``search_<score>`` columns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from unizoo.errors import RecipeError, UsageError
from unizoo.eval.chance import format_scores
from unizoo.eval.search import check_search, search
from unizoo.eval.verifiers import Verifier, build_verifier
from unizoo.model import UnifiedModel

log = logging.getLogger(__name__)


@dataclass
class SearchEvaluation:
    """A search's settings and verifier, run on fixed prompts; ``__call__(model) -> scores``."""

    prompts: Sequence[str]
    evaluator: Callable[[list[str], torch.Tensor], dict[str, float]]
    verifier: Verifier
    verifier_name: str
    method: str
    budget: int
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    step: float = 0.5
    neighbours: int = 2

    def __call__(self, model: UnifiedModel) -> dict[str, float]:
        start = time.perf_counter()
        result = search(model, self.prompts, self.verifier, self.method, self.budget, self.steps, self.guidance, self.seed,
                        self.step, self.neighbours)
        scores = self.evaluator(list(self.prompts), result.images)
        scores.update(
            nfe=float(result.nfe()),
            verifier_score=float(result.scores.mean()),
            plain_verifier_score=float(result.candidate_scores[0].mean()),
        )
        log.info("search (%s, budget %d, verifier %s; %.0f s): %s", self.method, self.budget, self.verifier_name,
                 time.perf_counter() - start, format_scores(scores))
        return scores


def search_evaluation(recipe: DictConfig, datamodule, model: UnifiedModel, prompts: Sequence[str], evaluator) -> SearchEvaluation | None:
    """The recipe's ``evaluation.search``, or None where it is off (or the recipe predates it)."""
    settings = OmegaConf.select(recipe, "evaluation.search")
    if settings is None or settings.get("method") is None:
        return None
    settings = OmegaConf.to_container(settings, resolve=True)
    try:
        check_search(settings["method"], settings["budget"], settings["step"], settings["neighbours"])
        verifier = build_verifier(settings["verifier"], model, recipe, datamodule)
    except UsageError as error:
        raise RecipeError(f"evaluation.search: {error}") from None
    return SearchEvaluation(
        prompts=prompts,
        evaluator=evaluator,
        verifier=verifier,
        verifier_name=settings["verifier"],
        method=settings["method"],
        budget=settings["budget"],
        steps=recipe.evaluation.steps,
        guidance=recipe.evaluation.guidance,
        seed=recipe.evaluation.seed,
        step=settings["step"],
        neighbours=settings["neighbours"],
    )
