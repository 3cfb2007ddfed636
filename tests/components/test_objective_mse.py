"""MSE regression: each loss is its reference formula, sampling is one deterministic pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unizoo.components.generators.dit import dit
from unizoo.components.objectives.mse import LOSSES, MSERegression


class Fixed(nn.Module):
    """Returns a fixed prediction and records what the objective fed it."""

    def __init__(self, prediction: torch.Tensor):
        super().__init__()
        self.prediction = prediction
        self.token_shape = tuple(prediction.shape[1:])
        self.null_condition = nn.Parameter(torch.full((1, 1, 1), 7.0))
        self.seen = {}

    def drop_condition(self, cond, drop):
        return torch.where(drop.view(-1, 1, 1), self.null_condition.expand_as(cond), cond)

    def forward(self, x, t, cond):
        self.seen = {"x": x, "t": t, "cond": cond}
        return self.prediction


class ConditionEcho(nn.Module):
    """Prediction = x + 10 * t + the condition's first channel, broadcast over (N, C): exact in closed form."""

    token_shape = (3, 2)

    def __init__(self):
        super().__init__()
        self.null_condition = nn.Parameter(torch.full((1, 1, 1), -1.0))
        self.calls = 0

    def drop_condition(self, cond, drop):
        return torch.where(drop.view(-1, 1, 1), self.null_condition.expand_as(cond), cond)

    def forward(self, x, t, cond):
        self.calls += 1
        return x + 10 * t.view(-1, 1, 1) + cond[:, :1, :1]


# One batch of two tokens, C = 2, chosen so every loss is a round number.
PREDICTION = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
TARGET = torch.tensor([[[0.0, 1.0], [0.0, 4.0]]])
# diff = [[1, -1], [0, -2]]: squared [1, 1, 0, 4] -> mean 1.5; |.| [1, 1, 0, 2] -> mean 1.0.
# cos: token 0 orthogonal (0), token 1 parallel (1) -> mean(1 - cos) = 0.5.
EXPECTED = {"mse": 1.5, "cosine": 0.5, "cosine_l1": 1.5}


@pytest.mark.parametrize("kind", LOSSES)
def test_each_loss_is_its_hand_computed_value(kind):
    generator = Fixed(PREDICTION)
    loss = MSERegression(loss=kind).loss(generator, TARGET, torch.ones(1, 2, 1))
    assert loss.item() == pytest.approx(EXPECTED[kind], abs=1e-6)
    # The generator saw the fixed inputs: zero tokens at t = 1, the condition untouched.
    assert torch.equal(generator.seen["x"], torch.zeros_like(TARGET))
    assert torch.equal(generator.seen["t"], torch.ones(1))
    assert torch.equal(generator.seen["cond"], torch.ones(1, 2, 1))


def test_condition_dropout_uses_the_null_condition_at_the_configured_rate():
    generator = Fixed(torch.zeros(4000, 2, 2))
    MSERegression(condition_dropout=0.25).loss(generator, torch.zeros(4000, 2, 2), torch.zeros(4000, 1, 1))
    dropped = (generator.seen["cond"] == 7.0).float().mean()
    assert abs(dropped.item() - 0.25) < 0.03


@pytest.fixture
def tiny_dit():
    torch.manual_seed(0)
    return dit("tiny", token_dim=4, num_tokens=16, condition_dim=32, depth=1, hidden_size=32, num_heads=2)


def test_sample_is_one_deterministic_pass_of_the_generator(tiny_dit):
    # Random weights everywhere, so the zero-initialised output layers do not make
    # every answer trivially 0.
    torch.manual_seed(1)
    for param in tiny_dit.parameters():
        nn.init.normal_(param, std=0.1)
    cond = torch.randn(3, 5, 32)
    objective = MSERegression()
    first = objective.sample(tiny_dit, cond, steps=1, rng=torch.Generator().manual_seed(0))
    second = objective.sample(tiny_dit, cond, steps=50, rng=torch.Generator().manual_seed(123))
    assert first.shape == (3, 16, 4)
    assert first.abs().max() > 0
    assert torch.equal(first, second)
    with torch.no_grad():
        assert torch.equal(first, tiny_dit(torch.zeros(3, 16, 4), torch.ones(3), cond))


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_guidance_extrapolates_from_the_null_condition_in_one_batched_pass(guidance):
    generator = ConditionEcho()
    cond = torch.tensor([2.0, 5.0]).view(2, 1, 1)
    tokens = MSERegression().sample(generator, cond, guidance=guidance)
    # cond branch: 10 + c; null branch: 10 - 1; guided: (10 - 1) + g * (c + 1).
    expected = (9.0 + guidance * (cond + 1)).expand(2, 3, 2)
    assert torch.allclose(tokens, expected)
    assert generator.calls == 1


def test_a_tiny_dit_learns_to_regress_fixed_targets(tiny_dit):
    torch.manual_seed(2)
    cond = torch.randn(4, 3, 32)
    targets = torch.randn(4, 16, 4)
    objective = MSERegression()
    optimizer = torch.optim.Adam(tiny_dit.parameters(), lr=3e-3)
    first = objective.loss(tiny_dit, targets, cond).item()
    for _ in range(150):
        optimizer.zero_grad()
        loss = objective.loss(tiny_dit, targets, cond)
        loss.backward()
        optimizer.step()
    final = objective.loss(tiny_dit, targets, cond).item()
    assert final < first / 10, (first, final)
    error = (objective.sample(tiny_dit, cond) - targets).pow(2).mean().item()
    assert error == pytest.approx(final, rel=1e-4)
    assert error < 0.1


@pytest.mark.parametrize(("argument", "choices"), [("loss", "mse, cosine, cosine_l1"), ("input_noise", "zeros")])
def test_unknown_choice_is_a_clear_error(argument, choices):
    with pytest.raises(ValueError, match=f"objective.{argument}='nope'; valid choices: {choices}"):
        MSERegression(**{argument: "nope"})
