"""Verifiers: one score per (prompt, image), higher is better, for a search over initial noises.

``verifier(prompts, images (B, 3, H, W) in [-1, 1]) -> scores (B,)``. Three, after Ma et al.
("Inference-Time Scaling for Diffusion Models beyond Scaling Denoising Steps", arXiv 2501.09732),
which pair a search algorithm with a verifier:

* ``oracle``: the exact shapes evaluator (``unizoo.eval.geneval``) itself: the fraction of the
  prompt's checks the image passes (its GenEval categories and its strict check). The score
  the search is judged by, so what a search can reach at best; no model has it.
* ``agreement``: caption-image agreement, 100 x the cosine of the tiny CLIP's image and text
  embeddings (``unizoo.eval.agreement``): an outside judge, as the paper's CLIP verifier.
* ``self``: the model's own understanding path: the backbone captions the image and the caption
  is compared with the prompt, attribute by attribute (shapes, colours, counts, relation,
  binding; ``unizoo.eval.understanding``). Self-verification: only a unified model, which reads
  images with the same backbone that conditions its generator, has it. It needs a run trained
  with a vision encoder (``strategy=joint`` or ``sequential``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from omegaconf import DictConfig

from unizoo.data.captions import parse_caption
from unizoo.errors import UsageError
from unizoo.eval.generation_evaluator import caption_image_agreement, has_exact_evaluator
from unizoo.eval.geneval import score_prompt
from unizoo.eval.understanding import ATTRIBUTES, compare_captions
from unizoo.model import UnifiedModel

VERIFIERS = ("oracle", "agreement", "self")
Verifier = Callable[[Sequence[str], torch.Tensor], torch.Tensor]
CAPTION_BATCH = 64  # images captioned per call of the backbone


def oracle(prompts: Sequence[str], images: torch.Tensor) -> torch.Tensor:
    """The fraction of each prompt's checks its image passes: the GenEval categories of its kind and its strict score."""
    scores = []
    for prompt, image in zip(prompts, images, strict=True):
        checks = score_prompt(prompt, image)
        scores.append(sum(checks.values()) / len(checks))
    return torch.tensor(scores)


class AgreementVerifier:
    """Caption-image agreement per pair (100 x cosine in the CLIP's embedding space)."""

    def __init__(self, agreement) -> None:
        self.agreement = agreement

    def __call__(self, prompts: Sequence[str], images: torch.Tensor) -> torch.Tensor:
        return self.agreement.per_pair(prompts, images)


class SelfVerifier:
    """The model captions each image with its own understanding path; the score is the fraction of the
    prompt's attributes (shapes, colours, counts, relation, binding) the caption gets right."""

    def __init__(self, model: UnifiedModel) -> None:
        if not model.backbone.understands_images:
            raise UsageError(
                "verifier 'self' captions the samples with the model's own understanding path, but this model's backbone "
                "reads no images (backbone.vision_encoder is null): use a run trained with strategy=joint or "
                f"strategy=sequential, or another verifier ({', '.join(v for v in VERIFIERS if v != 'self')})"
            )
        self.model = model

    def __call__(self, prompts: Sequence[str], images: torch.Tensor) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.backbone.parameters()).device
        captions = []
        for start in range(0, len(images), CAPTION_BATCH):
            captions += self.model.backbone.caption(images[start : start + CAPTION_BATCH].to(device))
        self.model.train(was_training)
        scores = []
        for caption, prompt in zip(captions, prompts, strict=True):
            right = compare_captions(caption, prompt)
            scores.append(sum(right[name] for name in ATTRIBUTES) / len(ATTRIBUTES))
        return torch.tensor(scores)


def _check_prompts(name: str, prompts: Sequence[str]) -> None:
    """The oracle and self-verification read the prompt with the shapes grammar: a prompt outside it is named."""
    for prompt in prompts:
        try:
            parse_caption(prompt)
        except ValueError as error:
            raise UsageError(
                f"verifier {name!r} compares with the prompt parsed by the shapes captions' grammar, which cannot read "
                f"{prompt!r} ({error}); use verifier 'agreement' for other captions"
            ) from None


def build_verifier(name: str, model: UnifiedModel, recipe: DictConfig, datamodule) -> Verifier:
    """The verifier called ``name`` (one of ``VERIFIERS``) for ``model`` trained on ``datamodule`` with ``recipe``."""
    if name not in VERIFIERS:
        raise UsageError(f"unknown verifier {name!r}; valid verifiers: {', '.join(VERIFIERS)}")
    if name == "oracle":
        if not has_exact_evaluator(datamodule):
            raise UsageError("verifier 'oracle' is the shapes evaluator, and this data has none: use 'agreement' (or 'self')")
        return _checked(name, oracle)
    if name == "self":
        return _checked(name, SelfVerifier(model))
    # Forked: building the CLIP draws initial weights, which must not move the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        return AgreementVerifier(caption_image_agreement(recipe, datamodule))


def _checked(name: str, verifier: Verifier) -> Verifier:
    """`verifier`, refusing prompts its parser cannot read with a message instead of a traceback."""

    def verify(prompts: Sequence[str], images: torch.Tensor) -> torch.Tensor:
        _check_prompts(name, prompts)
        return verifier(prompts, images)

    return verify
