"""LaTtE (layerwise timestep experts): groups of blocks per noise range, one group per sampling step."""

from __future__ import annotations

import pytest
import torch

from unizoo.components.generators.dit import dit
from unizoo.components.generators.latte_dit import latte_dit
from unizoo.components.objectives.flow_matching import FlowMatching

SIZE = dict(token_dim=4, num_tokens=16, condition_dim=8, depth=4, hidden_size=32, num_heads=2)


def _randomised(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _latte(groups, **kw):
    torch.manual_seed(0)
    return latte_dit("tiny", groups=groups, **{**SIZE, **kw})


def test_one_group_is_the_dit_bit_for_bit():
    torch.manual_seed(0)
    plain = _randomised(dit("tiny", **SIZE))
    latte = _randomised(_latte(1))
    x, t, cond = torch.randn(5, 16, 4), torch.rand(5), torch.randn(5, 3, 8)
    with torch.no_grad():
        assert torch.equal(latte(x, t, cond), plain(x, t, cond))


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_same_parameters_as_the_plain_dit(groups):
    torch.manual_seed(0)
    plain = dit("tiny", **SIZE)
    latte = _latte(groups)
    assert [(n, p.shape) for n, p in latte.named_parameters()] == [(n, p.shape) for n, p in plain.named_parameters()]


def test_noise_levels_pick_their_group():
    latte = _latte(4)
    t = torch.tensor([0.0, 0.1, 0.25, 0.49, 0.5, 0.74, 0.75, 0.99, 1.0])
    assert latte.group_of(t).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 3]
    custom = _latte(2, boundaries=[0.7])
    assert custom.group_of(torch.tensor([0.69, 0.7, 1.0])).tolist() == [0, 1, 1]


def _count_block_calls(model):
    calls = []
    for index, block in enumerate(model.blocks):
        block.register_forward_hook(lambda module, args, out, index=index: calls.append((index, args[0].shape[0])))
    return calls


@pytest.mark.parametrize("groups", [2, 4])
def test_a_sampling_step_runs_exactly_one_group(groups):
    latte = _randomised(_latte(groups))
    calls = _count_block_calls(latte)
    per_step = []
    original = latte.forward

    def step(x, t, cond, cond_mask=None):
        before = len(calls)
        out = original(x, t, cond, cond_mask)
        per_step.append((float(t[0]), [index for index, _ in calls[before:]]))
        return out

    latte.forward = step
    steps = 8
    FlowMatching(shift=1.0).sample(latte, torch.randn(3, 5, 8), steps=steps, guidance=3.0, rng=torch.Generator().manual_seed(0))
    size = 4 // groups
    assert len(per_step) == steps  # one generator call per step ([cond; uncond] batched)
    for sigma, blocks in per_step:
        group = min(int(sigma * groups), groups - 1)
        assert blocks == list(range(group * size, (group + 1) * size)), (sigma, blocks)
    # Every group served its own steps: the path from noise (last group) to data (first).
    assert [min(int(s * groups), groups - 1) for s, _ in per_step] == sorted((min(int(s * groups), groups - 1) for s, _ in per_step), reverse=True)
    assert {min(int(s * groups), groups - 1) for s, _ in per_step} == set(range(groups))


def test_a_mixed_batch_routes_each_sample_to_its_group():
    latte = _randomised(_latte(2))
    x, cond = torch.randn(4, 16, 4), torch.randn(4, 3, 8)
    t = torch.tensor([0.9, 0.1, 0.6, 0.3])
    with torch.no_grad():
        together = latte(x, t, cond)
        for row in range(4):
            torch.testing.assert_close(together[row : row + 1], latte(x[row : row + 1], t[row : row + 1], cond[row : row + 1]), rtol=0, atol=1e-6)
        # The group-0 samples ran blocks 0 and 1 only: the same as a 2-block DiT made of them.
        h, c, block_c, stacks, _ = latte.embed(x, t, cond)
        expected = latte.final_layer(latte.run_blocks([0, 1], h, block_c, stacks), c)
    torch.testing.assert_close(together[[1, 3]], expected[[1, 3]], rtol=0, atol=1e-6)


def test_training_reaches_only_the_groups_of_the_batch_but_runs_every_group():
    latte = _randomised(_latte(2))
    x, cond = torch.randn(4, 16, 4), torch.randn(4, 3, 8)
    latte(x, torch.full((4,), 0.2), cond).square().mean().backward()
    grads = {index: latte.blocks[index].mlp[0].weight.grad for index in range(4)}
    assert all(g is not None for g in grads.values())  # every parameter takes part (data-parallel training needs it)
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0
    assert grads[2].abs().sum() == 0 and grads[3].abs().sum() == 0


def test_flow_matching_trains_a_latte_generator():
    torch.manual_seed(0)
    latte = _latte(2)
    objective = FlowMatching(shift=1.0, condition_dropout=0.0)
    x0 = torch.randn(8, 16, 4)
    cond = x0.mean(1, keepdim=True).expand(8, 3, 4).repeat(1, 1, 2)  # a condition that says something about x0

    def held_out_loss():  # the same noise and noise levels (both groups) before and after
        torch.manual_seed(12345)
        with torch.no_grad():
            return sum(objective.loss(latte, x0, cond).item() for _ in range(8)) / 8

    before = held_out_loss()
    optimizer = torch.optim.Adam(latte.parameters(), lr=3e-3)
    for step in range(100):
        torch.manual_seed(step)
        loss = objective.loss(latte, x0, cond)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert held_out_loss() < 0.85 * before  # 2.02 -> 1.57 when written


def test_bad_groups_and_boundaries_name_the_valid_ones():
    with pytest.raises(ValueError, match=r"generator.groups=3: .* valid choices at depth 4: 1, 2, 4"):
        _latte(3)
    with pytest.raises(ValueError, match=r"generator.boundaries=\[0.6, 0.4, 0.8\]: expected 3 increasing noise levels"):
        _latte(4, boundaries=[0.6, 0.4, 0.8])
    with pytest.raises(ValueError, match="expected 1 increasing"):
        _latte(2, boundaries=[0.2, 0.5])
