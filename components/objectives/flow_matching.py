"""Rectified flow matching with a velocity target, sampled through diffusers' Euler scheduler.

Convention (diffusers'): sigma 1 is noise, `x_t = sigma * noise + (1 - sigma) * x0`,
and the model predicts the velocity `noise - x0`. The generator receives sigma in
[0, 1] as its timestep. Classifier-free guidance comes from condition dropout: a
dropped row sees the generator's learned null condition.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import nn
from torch.nn import functional as F

from unizoo.components.objectives.guidance import guided

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The resolution shift of SD3 / diffusers: `shift * s / (1 + (shift - 1) * s)` (identity at 1)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


class FlowMatching(nn.Module):
    """`loss(generator, x0, cond)` and `sample(generator, cond, steps, guidance)` for rectified flow."""

    def __init__(
        self,
        timestep_sampling: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        condition_dropout: float = 0.1,
        shift: float = 1.0,
        num_train_timesteps: int = 1000,
        sample_steps: int = 30,
        guidance: float = 3.0,
    ) -> None:
        super().__init__()
        if timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(
                f"objective.timestep_sampling={timestep_sampling!r}; valid choices: {', '.join(TIMESTEP_SAMPLINGS)}"
            )
        self.timestep_sampling = timestep_sampling
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.condition_dropout = condition_dropout
        self.shift = shift
        self.num_train_timesteps = num_train_timesteps
        # Sampler defaults, used where a caller passes None.
        self.sample_steps, self.guidance = sample_steps, guidance

    def sample_sigmas(self, batch: int, device: torch.device) -> torch.Tensor:
        """Training noise levels `(B,)` in (0, 1)."""
        if self.timestep_sampling == "logit_normal":
            # SD3's logit-normal: more weight on the middle of the path, where the
            # velocity is hardest to predict.
            sigma = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(batch, device=device))
        else:
            sigma = torch.rand(batch, device=device)
        return shift_sigmas(sigma, self.shift)

    def loss(self, generator: nn.Module, x0: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Mean squared error of the predicted velocity; `x0` target tokens `(B, N, C)`, cond `(B, Q, D)`."""
        batch = x0.shape[0]
        noise = torch.randn_like(x0)
        sigma = self.sample_sigmas(batch, x0.device)
        s = sigma.view(batch, *([1] * (x0.dim() - 1))).to(x0.dtype)
        x_t = s * noise + (1 - s) * x0
        drop = torch.rand(batch, device=x0.device) < self.condition_dropout
        prediction = generator(x_t, sigma, generator.drop_condition(cond, drop))
        return F.mse_loss(prediction.float(), (noise - x0).float())

    def scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=self.shift)

    @torch.no_grad()
    def sample(
        self,
        generator: nn.Module,
        cond: torch.Tensor,
        steps: int | None = None,
        guidance: float | None = None,
        rng: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Tokens `(B, N, C)` integrated from noise in `steps` Euler steps, with classifier-free guidance.

        `steps` and `guidance` default to the recipe's `sample_steps` and `guidance`.
        """
        steps = steps or self.sample_steps
        guidance = self.guidance if guidance is None else guidance
        batch, device = cond.shape[0], cond.device
        scheduler = self.scheduler()
        scheduler.set_timesteps(steps, device=device)
        x = torch.randn((batch, *generator.token_shape), generator=rng, device="cpu").to(device, cond.dtype)
        for t in scheduler.timesteps:
            sigma = (t / self.num_train_timesteps).expand(batch).to(device)
            x = scheduler.step(guided(generator, x, sigma, cond, guidance), t, x).prev_sample
        return x
