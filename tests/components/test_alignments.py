"""The alignment axis: REPA's loss and head, the generator's hidden states it reads, and `none`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unizoo.components.alignments.none import NoAlignment
from unizoo.components.alignments.repa import REPA, alignment_loss, resample_tokens
from unizoo.components.generators.dit import dit
from unizoo.components.generators.hidden_states import capture_block_output


class FixedEncoder(nn.Module):
    """A stand-in encoder: features `(B, side², width)` that depend on the image (its mean pixel per channel, tiled)."""

    def __init__(self, side: int = 4, width: int = 6) -> None:
        super().__init__()
        self.side, self.width = side, width
        self.mix = nn.Linear(3, width)
        self.requires_grad_(False)

    @property
    def token_shape(self) -> tuple[int, int]:
        return self.side * self.side, self.width

    def prepare(self, datamodule) -> None:
        pass

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(images, self.side).flatten(2).transpose(1, 2)  # (B, side², 3)
        return self.mix(pooled)


def tiny_generator(depth: int = 3, tokens: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return dit("tiny", token_dim=4, num_tokens=tokens, condition_dim=8, depth=depth, hidden_size=32, num_heads=2)


def forward(generator: nn.Module, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn(batch, *generator.token_shape)
    return generator(x, torch.rand(batch), torch.randn(batch, 3, 8))


def test_alignment_loss_is_zero_when_aligned_one_when_orthogonal_two_when_opposite():
    features = torch.randn(3, 16, 6)
    assert alignment_loss(features, features).item() == pytest.approx(0.0, abs=1e-6)
    assert alignment_loss(2.5 * features, features).item() == pytest.approx(0.0, abs=1e-6)  # a cosine: scale-free
    assert alignment_loss(-features, features).item() == pytest.approx(2.0, abs=1e-6)
    a, b = torch.zeros(1, 1, 2), torch.zeros(1, 1, 2)
    a[..., 0], b[..., 1] = 1.0, 1.0
    assert alignment_loss(a, b).item() == pytest.approx(1.0, abs=1e-7)


def test_repa_loss_is_zero_when_the_projected_states_equal_the_features():
    generator = tiny_generator()
    repa = REPA(FixedEncoder(), generator, block=2)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    repa.projector = nn.Identity()  # the projection is then the hidden state itself
    with repa.capture(generator) as captured:
        forward(generator)
    captured._value = repa.targets(images)  # hidden states equal to the features
    assert repa.loss(captured, images).item() == pytest.approx(0.0, abs=1e-6)
    captured._value = -repa.targets(images)
    assert repa.loss(captured, images).item() == pytest.approx(2.0, abs=1e-6)


def test_capture_reads_exactly_the_chosen_blocks_output_and_leaves_no_hook():
    generator = tiny_generator(depth=3)
    with capture_block_output(generator, 2) as captured:
        output = forward(generator)
    # The same block output computed by hand: embed, then blocks 1 and 2.
    torch.manual_seed(1)
    x, t, cond = torch.randn(2, 16, 4), torch.rand(2), torch.randn(2, 3, 8)
    tokens = generator.x_embedder(x) + generator.pos_embed
    embedded = generator.cond_embedder(cond)
    c = generator.t_embedder(t) + generator.pooled_embedder(embedded.mean(dim=1))
    for block in generator.blocks[:2]:
        tokens = block(tokens, c, embedded)
    torch.testing.assert_close(captured.value, tokens, rtol=0, atol=0)
    assert all(not block._forward_hooks for block in generator.blocks)
    torch.testing.assert_close(forward(generator), output, rtol=0, atol=0)  # the generator's output is untouched


def test_alignment_gradient_reaches_the_blocks_up_to_the_chosen_one_and_the_head_only():
    generator = tiny_generator(depth=3)
    nn.init.normal_(generator.blocks[0].adaLN_modulation[-1].weight, std=0.1)  # open the zero-initialised gates
    repa = REPA(FixedEncoder(), generator, block=2)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with repa.capture(generator) as captured:
        forward(generator)
    repa.loss(captured, images).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in repa.projector.parameters())
    assert generator.x_embedder.weight.grad.abs().sum() > 0
    assert generator.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in generator.blocks[2].parameters())  # after the aligned block
    assert all(p.grad is None for p in generator.final_layer.parameters())
    assert all(p.grad is None for p in repa.encoder.parameters())  # frozen


def test_a_block_outside_the_generator_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"alignment.block=4: the generator has 3 blocks, so choose 1..3"):
        REPA(FixedEncoder(), tiny_generator(depth=3), block=4)
    with pytest.raises(ValueError, match=r"alignment.block=0"):
        REPA(FixedEncoder(), tiny_generator(depth=3), block=0)
    with pytest.raises(ValueError, match=r"alignment.weight=-1"):
        REPA(FixedEncoder(), tiny_generator(), weight=-1)


def test_features_are_resampled_to_the_generators_grid():
    grid = torch.arange(16.0).reshape(1, 4, 4)  # one channel on a 4x4 grid, row-major
    tokens = grid.reshape(1, 16, 1)
    assert resample_tokens(tokens, 16) is tokens
    up = resample_tokens(tokens, 64)
    assert up.shape == (1, 64, 1)
    constant = torch.full((2, 16, 3), 0.7)
    torch.testing.assert_close(resample_tokens(constant, 4), torch.full((2, 4, 3), 0.7))
    # Down to 2x2: each output token is the mean of its quadrant.
    down = resample_tokens(tokens, 4).flatten()
    torch.testing.assert_close(down, torch.tensor([2.5, 4.5, 10.5, 12.5]))
    with pytest.raises(ValueError, match="square grid"):
        resample_tokens(torch.zeros(1, 12, 1), 16)


def test_repa_targets_are_the_encoders_features_on_the_generators_grid():
    generator = tiny_generator(tokens=64)  # an 8x8 grid; the encoder's is 4x4
    repa = REPA(FixedEncoder(side=4, width=6), generator)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert repa.targets(images).shape == (2, 64, 6)
    assert [p.shape for p in repa.head_parameters()][-1] == (6,)  # the projector ends at the encoder's width


def test_none_adds_no_term_no_parameter_and_no_hook():
    generator = tiny_generator()
    none = NoAlignment(generator=generator)
    with none.capture(generator) as captured:
        forward(generator)
        assert all(not block._forward_hooks for block in generator.blocks)
    assert captured is None
    assert none.terms(captured, torch.zeros(1, 3, 32, 32)) == {}
    assert none.head_parameters() == [] and list(none.parameters()) == []
    with pytest.raises(RuntimeError, match="set alignment=repa"):
        none.loss(captured, torch.zeros(1, 3, 32, 32))
