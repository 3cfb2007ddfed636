"""Where the default recipe's bare step spends its time, part by part, on one image and on the batch.

On a GPU the default recipe's step is bound by the host: each operator costs the same dispatch
and launch whatever the batch (README, "What the host pays per step"). The loop benchmark gives
the whole step's bound; this says which part of the step pays it, and so what compiling (or
moving off the main thread) would buy. Each part of the generation stage's loss is run apart,
as the bare step runs it, on the batch's first image and on the whole batch:

* the representation's encoder, without gradients (the frozen VAE's tokens: what the target
  memo saves on the items it has seen);
* the backbone's tokenizer on the batch's captions: host work that grows with the batch and
  launches nothing;
* the conditioning (the backbone reading the captions, tokenizer included), forward and
  backward;
* the objective's loss through the generator, forward and backward, from the encoder's tokens
  and a fixed condition;
* gradient clipping and the optimiser's step.

Each is the median of `repeats` synchronised calls (`benchmarks.measure.time_call`) with its
operators counted once. Run apart, the parts add a little to the step (each backward starts
from its own seed gradient), so their sum is close to the bare step, not equal to it. Where
`compile` compiles the generator and the language model, their parts run compiled.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from unizoo.components.conditioning.condition import Condition, condition_parts
from unizoo.runtime.precision import compute_dtype

from .measure import OperatorCount, time_call

ENCODE = "the representation's encoder (no gradients)"
TOKENIZE = "the backbone's tokenizer"
CONDITIONING = "the conditioning (backbone), forward and backward"
GENERATOR = "the objective's loss through the generator, forward and backward"
OPTIMISER = "gradient clipping and the optimiser step"


def trainer_autocast(recipe, device_type: str) -> torch.autocast:
    """Autocast as Lightning applies the recipe's trainer precision (off for fp32)."""
    dtype = compute_dtype(recipe.trainer.precision)
    return torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32)


def clip_and_step(model, optimizer: torch.optim.Optimizer, recipe) -> None:
    """Gradient clipping at the trainer's value (where it sets one), then the optimiser step."""
    clip = recipe.trainer.get("gradient_clip_val")
    if clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip)
    optimizer.step()


def _parts(model, recipe, batch: dict) -> dict[str, Callable[[], None]]:
    """The step's parts on `batch`, each a call that runs it once as the bare step runs it."""
    device_type = batch["image"].device.type

    def autocast() -> torch.autocast:
        return trainer_autocast(recipe, device_type)

    images, captions = batch["image"], batch["caption"]
    with torch.no_grad(), autocast():
        tokens = model.representation.encode(images)
        condition = model.conditioning(model.backbone, captions)
    optimizer = model.optimizer_factory([p for p in model.parameters() if p.requires_grad])

    def encode() -> None:
        with torch.no_grad(), autocast():
            model.representation.encode(images)

    def tokenize() -> None:
        model.backbone.tokenize(captions)

    def conditioning() -> None:
        with autocast():
            read, _ = condition_parts(model.conditioning(model.backbone, captions))
        read.backward(torch.ones_like(read))

    def generator() -> None:
        # The condition's tokens as a leaf that asks for gradients, as the backbone's output does in the step.
        read, mask = condition_parts(condition)
        read = read.detach().requires_grad_()
        fixed = Condition(read, mask) if isinstance(condition, Condition) else read
        with autocast():
            loss = model.objective.loss(model.generator, tokens, fixed, rng=model.step_rng)
        loss.backward()

    def optimise() -> None:
        clip_and_step(model, optimizer, recipe)
        # Gradients are left in place: the next call steps on them again (set to None, the step would skip them).

    return {ENCODE: encode, TOKENIZE: tokenize, CONDITIONING: conditioning, GENERATOR: generator, OPTIMISER: optimise}


def step_parts(model, recipe, batches: dict[str, dict], device: torch.device, warmup: int, repeats: int) -> list[dict]:
    """Each part's median ms on each of `batches` (by label) and its operators on the first.

    Only the generation stage's loss has these parts; for another stage the list is empty.
    """
    if set(model.stage.losses) != {"generation"}:
        return []
    rows: dict[str, dict] = {}
    for number, (label, batch) in enumerate(batches.items()):
        for name, part in _parts(model, recipe, batch).items():
            row = rows.setdefault(name, {"part": name})
            row[f"{label}_ms"] = time_call(part, device, warmup, repeats).median_s * 1e3
            if number == 0:
                count = OperatorCount()
                with count:
                    part()
                row["operators"] = count.operators
    model.zero_grad(set_to_none=True)
    return list(rows.values())
