"""Flow matching: the loss is the reference formula, the sampler integrates the ODE exactly."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from unizoo.components.objectives.flow_matching import (
    MIN_PREDICTION_SIGMA, SHIFT_BASE_DIM, FlowMatching, dimension_shift, shift_sigmas,
)


class ConstantVelocity(nn.Module):
    """A generator whose velocity is known in closed form: v = noise - x0 for a fixed x0.

    For x_t = s * noise + (1 - s) * x0, the exact velocity is (x_t - x0) / s; integrating
    it from s=1 to 0 must land on x0 whatever the noise, so the sampler's result is exact.
    """

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0 = x0
        self.token_shape = tuple(x0.shape[1:])
        self.null_condition = nn.Parameter(torch.zeros(1, 1, 1))
        self.calls = []

    def drop_condition(self, cond, drop):
        return torch.where(drop.view(-1, 1, 1), self.null_condition.expand_as(cond), cond)

    def forward(self, x, sigma, cond):
        self.calls.append(sigma.clone())
        # Guided sampling doubles the batch ([conditional; unconditional]).
        x0 = self.x0.repeat(x.shape[0] // self.x0.shape[0], 1, 1)
        return (x - x0) / sigma.view(-1, 1, 1)


class ConstantData(ConstantVelocity):
    """The same fixed x0, output as the clean target itself (what an x0-predicting generator learns)."""

    def forward(self, x, sigma, cond):
        self.calls.append(sigma.clone())
        return self.x0.repeat(x.shape[0] // self.x0.shape[0], 1, 1)


class Recorder(nn.Module):
    """Returns zeros and records what the objective fed it."""

    def __init__(self):
        super().__init__()
        self.null_condition = nn.Parameter(torch.full((1, 1, 3), 7.0))
        self.seen = {}

    def drop_condition(self, cond, drop):
        return torch.where(drop.view(-1, 1, 1), self.null_condition.expand_as(cond), cond)

    def forward(self, x, sigma, cond):
        self.seen = {"x": x, "sigma": sigma, "cond": cond}
        return torch.zeros_like(x)


def test_loss_is_mse_to_the_velocity_of_diffusers_convention():
    torch.manual_seed(0)
    x0 = torch.randn(16, 5, 4)
    generator = Recorder()
    objective = FlowMatching(timestep_sampling="uniform", condition_dropout=0.0)
    cond = torch.randn(16, 2, 3)
    torch.manual_seed(1)
    loss = objective.loss(generator, x0, cond)
    # Replay the same draws: noise first, then sigma.
    torch.manual_seed(1)
    noise = torch.randn_like(x0)
    sigma = torch.rand(16)
    x_t = sigma.view(-1, 1, 1) * noise + (1 - sigma.view(-1, 1, 1)) * x0
    assert torch.allclose(generator.seen["sigma"], sigma)
    assert torch.allclose(generator.seen["x"], x_t)
    # The generator predicted 0, so the loss is the mean squared velocity.
    assert torch.allclose(loss, ((noise - x0) ** 2).mean())


def test_condition_dropout_uses_the_null_condition_at_the_configured_rate():
    generator = Recorder()
    objective = FlowMatching(condition_dropout=0.25)
    cond = torch.zeros(4000, 1, 3)
    objective.loss(generator, torch.zeros(4000, 2, 2), cond)
    dropped = (generator.seen["cond"] == 7.0).all(-1).squeeze(1).float().mean()
    assert abs(dropped.item() - 0.25) < 0.03


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_sigmas_lie_in_the_unit_interval(sampling):
    sigmas = FlowMatching(timestep_sampling=sampling, shift=3.0).sample_sigmas(10000, torch.device("cpu"))
    assert sigmas.min() > 0 and sigmas.max() < 1
    # shift > 1 moves mass towards noise, as in SD3.
    assert sigmas.mean() > 0.6


def test_shift_matches_diffusers_scheduler():
    # The scheduler's training table is shift(t / 1000) for t = 1000 .. 1: the same
    # transform the objective applies to its training sigmas.
    scheduler = FlowMatching(shift=3.0).scheduler()
    unshifted = torch.arange(1000, 0, -1) / 1000
    assert torch.allclose(scheduler.sigmas, shift_sigmas(unshifted, 3.0), atol=1e-6)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_sampler_integrates_the_exact_velocity_to_the_data(guidance):
    torch.manual_seed(0)
    x0 = torch.randn(3, 6, 2)
    generator = ConstantVelocity(x0)
    samples = FlowMatching().sample(generator, torch.zeros(3, 1, 1), steps=5, guidance=guidance)
    # Euler on a straight path is exact, so 5 steps already land on the data.
    assert torch.allclose(samples, x0, atol=1e-4)
    assert generator.calls[0].max() == pytest.approx(1.0)
    assert len(generator.calls) == 5


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_an_x0_prediction_is_integrated_as_its_velocity_to_the_data(guidance):
    torch.manual_seed(0)
    x0 = torch.randn(3, 6, 2)
    samples = FlowMatching(prediction="x0").sample(ConstantData(x0), torch.zeros(3, 1, 1), steps=5, guidance=guidance)
    # (x_t - x0) / sigma is the exact velocity of the straight path: Euler lands on the data.
    assert torch.allclose(samples, x0, atol=1e-4)


def test_x0_prediction_loss_is_the_velocity_mse_of_the_implied_velocity():
    torch.manual_seed(0)
    x0 = torch.randn(64, 5, 4)
    generator = Recorder()  # predicts x0_hat = 0
    objective = FlowMatching(timestep_sampling="uniform", condition_dropout=0.0, prediction="x0")
    cond = torch.randn(64, 2, 3)
    torch.manual_seed(1)
    loss = objective.loss(generator, x0, cond)
    torch.manual_seed(1)
    noise = torch.randn_like(x0)
    sigma = torch.rand(64).view(-1, 1, 1)
    x_t = sigma * noise + (1 - sigma) * x0
    # v_hat = (x_t - 0) / max(sigma, 0.05), compared with the true velocity noise - x0.
    implied = x_t / sigma.clamp_min(MIN_PREDICTION_SIGMA)
    assert torch.allclose(loss, ((implied - (noise - x0)) ** 2).mean(), rtol=1e-5)
    # A perfect x0 prediction has zero loss wherever sigma is above the clip.
    perfect = FlowMatching(timestep_sampling="uniform", condition_dropout=0.0, prediction="x0")
    perfect.sample_sigmas = lambda batch, device, shape=None, rng=None: torch.full((batch,), 0.5)
    assert perfect.loss(ConstantData(x0), x0, torch.zeros(64, 1, 3)).item() == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("prediction", ["velocity", "x0"])
def test_a_path_started_part_way_runs_only_the_remaining_steps_to_the_data(prediction):
    torch.manual_seed(0)
    x0 = torch.randn(3, 6, 2)
    generator = ConstantVelocity(x0) if prediction == "velocity" else ConstantData(x0)
    objective = FlowMatching(prediction=prediction)
    samples = objective.sample(generator, torch.zeros(3, 1, 1), steps=10, guidance=1.0, start=x0, start_sigma=0.5)
    assert torch.allclose(samples, x0, atol=1e-4)
    # diffusers' 10 sigmas run 1.0, 0.889, ..., 0.556, 0.445, ..., 0.001: the path starts at 0.445, the
    # first at or below 0.5, and takes the last 5 steps.
    assert len(generator.calls) == 5 and generator.calls[0].max() == pytest.approx(0.445, abs=1e-3)
    # start_sigma 1 is sampling from noise: the same draw, the same result.
    from_noise = objective.sample(generator, torch.zeros(3, 1, 1), steps=10, rng=torch.Generator().manual_seed(2))
    from_start = objective.sample(generator, torch.zeros(3, 1, 1), steps=10, rng=torch.Generator().manual_seed(2),
                                  start=torch.randn(3, 6, 2), start_sigma=1.0)
    assert torch.equal(from_noise, from_start)


def test_unknown_prediction_is_a_clear_error():
    with pytest.raises(ValueError, match="objective.prediction='noise'; valid choices: velocity, x0"):
        FlowMatching(prediction="noise")


def test_unknown_timestep_sampling_is_a_clear_error():
    with pytest.raises(ValueError, match="uniform, logit_normal"):
        FlowMatching(timestep_sampling="cosine")


def test_auto_shift_is_rae_dimension_shift():
    # sqrt(tokens x channels / 256): 1 for the default VAE target (64 x 4), 4 for 64 CLIP tokens of 64 channels.
    assert SHIFT_BASE_DIM == 256
    assert dimension_shift((64, 4)) == 1.0
    assert dimension_shift((64, 64)) == 4.0
    assert dimension_shift((256, 4)) == 2.0
    assert dimension_shift((64, 64), base_dim=4096) == 1.0


def test_auto_shift_drives_training_sigmas_and_the_sampler():
    objective = FlowMatching(timestep_sampling="uniform", shift="auto", condition_dropout=0.0)
    generator = Recorder()
    torch.manual_seed(0)
    objective.loss(generator, torch.zeros(20000, 64, 64), torch.zeros(20000, 1, 3))
    # Uniform sigmas shifted by 4: E[4u / (1 + 3u)] = 4/3 - 4 ln(4) / 9 ~= 0.717, against 0.5 unshifted.
    assert generator.seen["sigma"].mean().item() == pytest.approx(4 / 3 - 4 * math.log(4) / 9, abs=0.01)
    # The sampler uses the same shift: its schedule is diffusers' with shift 4 for a 64 x 64 target.
    reference = FlowMatching(shift=4.0).scheduler()
    assert torch.allclose(objective.scheduler((64, 64)).sigmas, reference.sigmas)
    x0 = torch.randn(2, 64, 64)
    exact = ConstantVelocity(x0)
    samples = objective.sample(exact, torch.zeros(2, 1, 1), steps=6, guidance=1.0)
    assert torch.allclose(samples, x0, atol=1e-4)
    shifted = FlowMatching(shift=4.0).scheduler()
    shifted.set_timesteps(6)
    assert torch.allclose(torch.stack(exact.calls)[:, 0], shifted.timesteps / 1000)


def test_auto_shift_needs_the_target_shape_and_rejects_nonsense():
    with pytest.raises(ValueError, match="token_shape"):
        FlowMatching(shift="auto").scheduler()
    with pytest.raises(ValueError, match="positive number or 'auto'"):
        FlowMatching(shift="big")
    with pytest.raises(ValueError, match="positive number or 'auto'"):
        FlowMatching(shift=0)
