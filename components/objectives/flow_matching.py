"""Rectified flow matching with a velocity target, sampled through diffusers' Euler scheduler.

Convention (diffusers'): sigma 1 is noise, `x_t = sigma * noise + (1 - sigma) * x0`,
and the model predicts the velocity `noise - x0`. The generator receives sigma in
[0, 1] as its timestep. Classifier-free guidance comes from condition dropout: a
dropped row sees the generator's learned null condition.

The timestep shift can follow the target's size (`shift="auto"`): RAE (Zheng et al.,
arXiv 2510.11690) shows that a target with more numbers per sample keeps more of its
signal at a given noise level, so the same sigma destroys less of it; shifting the
schedule by `sqrt(m / n)` (m = tokens x channels of the target, n a base dimension)
moves training and sampling towards noise until the corruption matches the base's.

What the generator outputs can be the velocity itself or the clean target x0
(`prediction="x0"`, Li & He's JiT, arXiv 2511.13720): the loss and the sampler
stay on the velocity, `(x_t - x0_hat) / sigma`, so only the network's job changes.
Clean data lies near a low-dimensional manifold while the velocity carries the full
noise; for wide target tokens (64-channel CLIP features) predicting x0 is the
easier function for a small network.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import nn
from torch.nn import functional as F

from unizoo.components.objectives.guidance import guided

log = logging.getLogger(__name__)

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
PREDICTIONS = ("velocity", "x0")
# Smallest sigma the training loss divides an x0 prediction by (JiT's clip): the loss
# weight 1 / sigma^2 stays bounded near the data end. The sampler divides exactly: its
# Euler step is -sigma long, so the last step lands on x0_hat whatever sigma is.
MIN_PREDICTION_SIGMA = 0.05


# The base dimension of `shift="auto"`: the embedded default's VAE target (64 tokens x 4
# channels at 32 px), for which shift 1 is tuned; a CLIP target of 64 x 64 gets sqrt(16) = 4.
SHIFT_BASE_DIM = 256


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The resolution shift of SD3 / diffusers: `shift * s / (1 + (shift - 1) * s)` (identity at 1)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def dimension_shift(token_shape: tuple[int, ...], base_dim: int = SHIFT_BASE_DIM) -> float:
    """RAE's dimension-dependent shift `sqrt(m / n)`: m the numbers per sample (N x C), n = `base_dim`."""
    return math.sqrt(math.prod(token_shape) / base_dim)


class FlowMatching(nn.Module):
    """`loss(generator, x0, cond)` and `sample(generator, cond, steps, guidance)` for rectified flow."""

    def __init__(
        self,
        timestep_sampling: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        condition_dropout: float = 0.1,
        shift: float | Literal["auto"] = 1.0,
        shift_base_dim: int = SHIFT_BASE_DIM,
        num_train_timesteps: int = 1000,
        sample_steps: int = 30,
        guidance: float = 3.0,
        prediction: Literal["velocity", "x0"] = "velocity",
    ) -> None:
        super().__init__()
        if timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(
                f"objective.timestep_sampling={timestep_sampling!r}; valid choices: {', '.join(TIMESTEP_SAMPLINGS)}"
            )
        self.timestep_sampling = timestep_sampling
        if prediction not in PREDICTIONS:
            raise ValueError(f"objective.prediction={prediction!r}; valid choices: {', '.join(PREDICTIONS)}")
        self.prediction = prediction
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.condition_dropout = condition_dropout
        if not (shift == "auto" or (isinstance(shift, (int, float)) and shift > 0)):
            raise ValueError(f"objective.shift={shift!r}: expected a positive number or 'auto' (sqrt(tokens x channels / shift_base_dim))")
        self.shift, self.shift_base_dim = shift, shift_base_dim
        self._logged_shift = False
        self.num_train_timesteps = num_train_timesteps
        # Sampler defaults, used where a caller passes None.
        self.sample_steps, self.guidance = sample_steps, guidance

    def shift_for(self, token_shape: tuple[int, ...] | None = None) -> float:
        """The timestep shift for targets of `token_shape` `(N, C)`: the recipe's number, or RAE's for "auto"."""
        if self.shift != "auto":
            return float(self.shift)
        if token_shape is None:
            raise ValueError("shift='auto' depends on the target's shape: pass its token_shape (N, C)")
        shift = dimension_shift(token_shape, self.shift_base_dim)
        if not self._logged_shift:
            log.info("flow matching: shift auto = sqrt(%d x %d / %d) = %.3g", *token_shape, self.shift_base_dim, shift)
            self._logged_shift = True
        return shift

    def sample_sigmas(
        self, batch: int, device: torch.device, token_shape: tuple[int, ...] | None = None, rng: torch.Generator | None = None
    ) -> torch.Tensor:
        """Training noise levels `(B,)` in (0, 1) for targets of `token_shape` (needed for "auto"), drawn from `rng`."""
        if self.timestep_sampling == "logit_normal":
            # SD3's logit-normal: more weight on the middle of the path, where the
            # velocity is hardest to predict.
            sigma = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(batch, device=device, generator=rng))
        else:
            sigma = torch.rand(batch, device=device, generator=rng)
        return shift_sigmas(sigma, self.shift_for(token_shape))

    def velocity(self, output: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor, min_sigma: float = 0.0) -> torch.Tensor:
        """The velocity `noise - x0` the generator's `output` at `(x_t, sigma)` stands for."""
        if self.prediction == "velocity":
            return output
        # x_t = sigma * noise + (1 - sigma) * x0  =>  noise - x0 = (x_t - x0) / sigma.
        s = sigma.clamp_min(min_sigma).view(-1, *([1] * (x_t.dim() - 1))).to(output.dtype)
        return (x_t - output) / s

    def loss(self, generator: nn.Module, x0: torch.Tensor, cond: torch.Tensor, rng: torch.Generator | None = None) -> torch.Tensor:
        """Mean squared error of the predicted velocity; `x0` target tokens `(B, N, C)`, cond `(B, Q, D)`.

        The noise, noise levels and condition dropout are drawn from `rng` (the training step's own
        generator, on `x0`'s device; None: the global one).
        """
        batch = x0.shape[0]
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=rng)
        sigma = self.sample_sigmas(batch, x0.device, tuple(x0.shape[1:]), rng)
        s = sigma.view(batch, *([1] * (x0.dim() - 1))).to(x0.dtype)
        x_t = s * noise + (1 - s) * x0
        drop = torch.rand(batch, device=x0.device, generator=rng) < self.condition_dropout
        output = generator(x_t, sigma, generator.drop_condition(cond, drop))
        return F.mse_loss(self.velocity(output.float(), x_t.float(), sigma, MIN_PREDICTION_SIGMA), (noise - x0).float())

    def scheduler(self, token_shape: tuple[int, ...] | None = None) -> FlowMatchEulerDiscreteScheduler:
        """diffusers' Euler scheduler with the shift for targets of `token_shape` (needed for "auto")."""
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=self.shift_for(token_shape))

    @torch.no_grad()
    def sample(
        self,
        generator: nn.Module,
        cond: torch.Tensor,
        steps: int | None = None,
        guidance: float | None = None,
        rng: torch.Generator | None = None,
        start: torch.Tensor | None = None,
        start_sigma: float = 1.0,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tokens `(B, N, C)` integrated from noise in `steps` Euler steps, with classifier-free guidance.

        `steps` and `guidance` default to the recipe's `sample_steps` and `guidance`. The noise is
        `noise` `(B, N, C)` where given (a search over initial noises, `unizoo.eval.search`), else
        drawn from `rng`. With `start` (clean tokens `(B, N, C)`), the path begins part-way
        (SDEdit): `start` noised to the first scheduled sigma at or below `start_sigma`,
        integrated from that step on.
        """
        steps = steps or self.sample_steps
        guidance = self.guidance if guidance is None else guidance
        batch, device = cond.shape[0], cond.device
        scheduler = self.scheduler(tuple(generator.token_shape))
        scheduler.set_timesteps(steps, device=device)
        if noise is None:
            noise = torch.randn((batch, *generator.token_shape), generator=rng, device="cpu")
        x = noise.to(device, cond.dtype)
        first = 0
        if start is not None:
            first = int((scheduler.sigmas[:-1] <= start_sigma + 1e-6).nonzero()[0])
            scheduler.set_begin_index(first)  # diffusers' img2img entry point: the schedule from step `first` on
            sigma = float(scheduler.sigmas[first])
            x = sigma * x + (1 - sigma) * start.to(device, x.dtype)
        for t in scheduler.timesteps[first:]:
            sigma = (t / self.num_train_timesteps).expand(batch).to(device)
            # Guidance mixes outputs linearly and the velocity is linear in the output: guide, then convert.
            x = scheduler.step(self.velocity(guided(generator, x, sigma, cond, guidance), x, sigma), t, x).prev_sample
        return x
