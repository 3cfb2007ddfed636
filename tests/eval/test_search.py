"""Inference-time search over initial noises: budget 1 is plain sampling, more finds what the verifier prefers,
compute is counted, and a run's evaluations and `unizoo sample --search` use it."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import STAGE_STEPS, TINY_OVERRIDES
from unizoo.cli import main
from unizoo.config.composition import compose_recipe
from unizoo.errors import UsageError
from unizoo.eval.search import search
from unizoo.studies.results import flatten_scores
from unizoo.training.runs import load_run
from unizoo.training.train import train

PROMPTS = ["a red circle", "two blue squares", "a green triangle above a red square"]


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
    """A tiny joint run (it reads images, so it can verify itself) whose evaluations also search."""
    overrides = [*TINY_OVERRIDES, "strategy=joint", *STAGE_STEPS["joint"], f"run_root={tmp_path_factory.mktemp('runs')}",
                 "evaluation.search.method=random", "evaluation.search.budget=2", "evaluation.search.verifier=self"]
    return train(compose_recipe("default", overrides))


@pytest.fixture(scope="module")
def model(joint_run):
    return load_run(joint_run)[1]


def brightness(prompts, images):
    """A verifier that prefers bright images: any fixed preference will do to check the search."""
    return images.float().mean(dim=(1, 2, 3))


@pytest.mark.parametrize("method", ["random", "zero_order"])
def test_budget_one_is_plain_sampling(model, method):
    plain = model.generate(PROMPTS, steps=2, guidance=2.0, seed=3)
    result = search(model, PROMPTS, brightness, method=method, budget=1, steps=2, guidance=2.0, seed=3)
    assert torch.equal(result.images, plain)
    assert result.chosen.tolist() == [0, 0, 0] and result.candidate_scores.shape == (1, 3)


@pytest.mark.parametrize("method", ["random", "zero_order"])
def test_the_best_candidate_per_prompt_is_kept(model, method):
    result = search(model, PROMPTS, brightness, method=method, budget=5, steps=2, guidance=2.0, seed=3, record=(1, 3))
    best, chosen = result.candidate_scores.max(dim=0)
    assert torch.equal(result.scores, best) and torch.equal(result.chosen, chosen)
    assert torch.equal(result.scores, brightness(PROMPTS, result.images))
    assert (result.scores >= result.candidate_scores[0]).all() and (result.chosen > 0).any()  # search found better noise
    # A smaller budget recorded on the way is that budget's search, exactly.
    for budget in (1, 3):
        alone = search(model, PROMPTS, brightness, method=method, budget=budget, steps=2, guidance=2.0, seed=3)
        assert torch.equal(result.recorded[budget][0], alone.images) and torch.equal(result.recorded[budget][1], alone.scores)


def test_function_evaluations_are_counted(model):
    guided = search(model, PROMPTS, brightness, budget=3, steps=4, guidance=2.0)
    assert guided.nfe_per_candidate == 8 and guided.nfe() == 24 and guided.nfe(1) == 8  # [cond; uncond] per step
    plain = search(model, PROMPTS, brightness, budget=2, steps=4, guidance=1.0)
    assert plain.nfe_per_candidate == 4 and plain.nfe() == 8


class NoiseAsImage(nn.Module):
    """A stand-in model whose "image" is its initial noise: the search's noise handling, alone."""

    def __init__(self) -> None:
        super().__init__()
        self.generator = nn.Identity()

    def initial_noise(self, count, seed=0, batch_size=64):
        return torch.randn((count, 16, 4), generator=torch.Generator().manual_seed(seed))

    def generate(self, prompts, steps=None, guidance=None, seed=0, batch_size=64, noise=None):
        return self.generator(noise).unsqueeze(1)


def test_zero_order_search_climbs_where_random_search_draws():
    target = torch.full((16, 4), 0.8)

    def closeness(prompts, images):  # a smooth landscape: noise near the target is better
        return -(images[:, 0] - target).square().mean(dim=(1, 2))

    prompts = ["p"] * 16
    random = search(NoiseAsImage(), prompts, closeness, method="random", budget=33)
    climb = search(NoiseAsImage(), prompts, closeness, method="zero_order", budget=33, step=0.3, neighbours=4)
    assert climb.scores.mean() > random.scores.mean() + 0.05
    # Every round starts from the best noise so far: the best score never falls, and it rises round after round.
    best_so_far = climb.candidate_scores.cummax(dim=0).values
    rounds = best_so_far[[0, 8, 16, 24, 32]].mean(dim=1)
    assert (rounds[1:] > rounds[:-1]).all(), rounds


def test_bad_search_settings_name_the_valid_ones(model):
    with pytest.raises(UsageError, match="valid methods: random, zero_order"):
        search(model, PROMPTS, brightness, method="beam")
    with pytest.raises(UsageError, match="budget 0: expected .* at least 1"):
        search(model, PROMPTS, brightness, budget=0)
    with pytest.raises(UsageError, match=r"step 1.5: expected the neighbourhood size in \(0, 1\]"):
        search(model, PROMPTS, brightness, method="zero_order", step=1.5)


def test_a_run_scores_its_searched_samples_beside_plain_ones(joint_run):
    metrics = json.loads((joint_run / "metrics.json").read_text())
    for phase in ("untrained", "joint"):
        searched = metrics[phase]["search"]
        assert 0.0 <= searched["overall"] <= 1.0 and searched["n"] == 4
        assert searched["nfe"] == 2 * 2 * 2  # budget 2 x evaluation.steps 2 x [cond; uncond]
        assert 0.0 <= searched["plain_verifier_score"] <= searched["verifier_score"] <= 1.0
        assert "search" not in metrics[phase]["generation"]
    columns = flatten_scores(metrics["joint"])
    assert columns["search_overall"] == metrics["joint"]["search"]["overall"] and columns["search_nfe"] == 8.0


def test_sample_command_searches(joint_run, tmp_path, capsys):
    out = tmp_path / "searched"
    args = ["sample", str(joint_run), "--prompt", "a red circle", "--n", "2", "--steps", "2", "--out", str(out)]
    assert main([*args, "--search", "random", "--budget", "3", "--verifier", "self"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["000.png", "001.png", "grid.png"]
    assert "search random, budget 3, verifier self: 12 generator evaluations per image (plain sampling: 4)" in capsys.readouterr().err
    assert main([*args, "--budget", "3"]) == 2  # a search setting without --search
    assert "--budget set how a search runs: add --search random or --search zero_order" in capsys.readouterr().err


def test_search_settings_in_a_recipe_are_checked_before_training(tiny_overrides):
    recipe = compose_recipe("default", [*tiny_overrides, "strategy.steps=1", "evaluation.search.method=random",
                                        "evaluation.search.verifier=self"])
    from unizoo.errors import RecipeError

    with pytest.raises(RecipeError, match="evaluation.search: verifier 'self' .* reads no images"):
        train(recipe)
