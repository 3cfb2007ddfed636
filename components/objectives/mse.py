"""Direct regression of the target tokens from the condition (MetaMorph / BLIP3-o's MSE baseline).

The generator is reused unchanged as a condition-to-token decoder: it is called once
with a fixed input (zero tokens) at the fixed time t = 1 and its output *is* the
predicted target `x0`. t = 1 is the "pure noise" end of flow matching, the one place
where a flow generator already has to produce tokens without any information from
its input, so the same network (and checkpoint) serves both objectives.

The regression is deterministic: for one condition it can only learn one answer
(the conditional mean under MSE), which is the known weakness of this baseline
against flow matching, and why it is worth comparing.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from unizoo.components.objectives.guidance import guided

LOSSES = ("mse", "cosine", "cosine_l1")
INPUT_NOISES = ("zeros",)

# The generator's time for the single regression pass: the noise end of the flow path.
REGRESSION_TIME = 1.0


def regression_loss(prediction: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Scalar loss between `(B, N, C)` tokens, computed in float32.

    * `mse`: mean over every element of `(prediction - target) ** 2`;
    * `cosine`: `1 - cos(prediction_token, target_token)` over C, mean over B and N;
    * `cosine_l1`: `cosine` plus the mean absolute error over every element. Both
      terms are per-element / per-token means, so neither scales with C or N.
    """
    prediction, target = prediction.float(), target.float()
    if kind == "mse":
        return F.mse_loss(prediction, target)
    # Cosine alone fixes only the direction of each token; L1 pins the magnitude
    # that the decoder of the representation still needs.
    cosine = (1 - F.cosine_similarity(prediction, target, dim=-1)).mean()
    if kind == "cosine":
        return cosine
    if kind == "cosine_l1":
        return cosine + F.l1_loss(prediction, target)
    raise ValueError(f"objective.loss={kind!r}; valid choices: {', '.join(LOSSES)}")


class MSERegression(nn.Module):
    """`loss(generator, x0, cond)` and `sample(generator, cond, ...)` for one-pass regression.

    Args:
        loss: one of `LOSSES` (see :func:`regression_loss`).
        condition_dropout: fraction of training rows whose condition is replaced by the
            generator's null condition; 0 by default, since a regressor has no use for
            it unless sampled with classifier-free guidance.
        input_noise: what the generator receives as its token input; only `"zeros"`
            (a fixed input, so the mapping is deterministic).
        guidance: the default guidance scale of `sample` (1 = none).
    """

    def __init__(
        self, loss: str = "mse", condition_dropout: float = 0.0, input_noise: str = "zeros", guidance: float = 1.0
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"objective.loss={loss!r}; valid choices: {', '.join(LOSSES)}")
        if input_noise not in INPUT_NOISES:
            raise ValueError(f"objective.input_noise={input_noise!r}; valid choices: {', '.join(INPUT_NOISES)}")
        self.loss_kind = loss
        self.condition_dropout = condition_dropout
        self.input_noise = input_noise
        self.guidance = guidance  # the default where a caller passes None

    def inputs(self, batch: int, token_shape: tuple[int, ...], device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed generator inputs: tokens `(B, N, C)` of zeros and time `(B,)` of ones."""
        x = torch.zeros((batch, *token_shape), device=device, dtype=dtype)
        t = torch.full((batch,), REGRESSION_TIME, device=device)
        return x, t

    def loss(self, generator: nn.Module, x0: torch.Tensor, cond: torch.Tensor, rng: torch.Generator | None = None) -> torch.Tensor:
        """Regression loss of the one-pass prediction; `x0` target tokens `(B, N, C)`, cond `(B, Q, D)`."""
        batch = x0.shape[0]
        x, t = self.inputs(batch, tuple(x0.shape[1:]), x0.device, x0.dtype)
        drop = torch.rand(batch, device=x0.device, generator=rng) < self.condition_dropout  # rng: the step's generator
        prediction = generator(x, t, generator.drop_condition(cond, drop))
        return regression_loss(prediction, x0, self.loss_kind)

    @torch.no_grad()
    def sample(
        self,
        generator: nn.Module,
        cond: torch.Tensor,
        steps: int | None = None,
        guidance: float | None = None,
        rng: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tokens `(B, N, C)` from one deterministic forward pass; cond `(B, Q, D)`.

        `steps`, `rng` and `noise` are accepted and ignored: the signature is flow matching's so
        that the model never branches on the objective (a search over noises finds one image here). `guidance != 1` extrapolates
        `uncond + guidance * (cond - uncond)` as classifier-free guidance does, which
        only means something if the generator was trained with `condition_dropout > 0`;
        None takes the recipe's `guidance`.
        """
        guidance = self.guidance if guidance is None else guidance
        x, t = self.inputs(cond.shape[0], tuple(generator.token_shape), cond.device, cond.dtype)
        return guided(generator, x, t, cond, guidance)
