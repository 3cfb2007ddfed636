"""Joint attention (MM-DiT): text and image tokens in one self-attention, padding never attended to."""

from __future__ import annotations

import pytest
import torch

from unizoo.components.conditioning.condition import Condition
from unizoo.components.generators.dit import dit
from unizoo.components.generators.dit_blocks import DiTBlock
from unizoo.components.generators.joint_attention import JointDiTBlock


def _joint(**kw):
    torch.manual_seed(0)
    model = dit("tiny", token_dim=4, num_tokens=16, condition_dim=8, depth=2, hidden_size=32, num_heads=2,
                condition_attention="joint", **kw)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _padded(seed=0):
    """Two captions of 6 token positions; the first left-padded over 3 of them."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :3] = False
    return torch.randn(2, 6, 8, generator=g), mask


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_no_image_token_sees_padding(backend):
    model = _joint(attention_backend=backend)
    tokens, mask = _padded()
    x, t = torch.randn(2, 16, 4), torch.rand(2)
    changed = tokens.clone()
    changed[~mask] = 100 * torch.randn_like(changed[~mask])  # whatever sits at the padded positions
    with torch.no_grad():
        out = model(x, t, Condition(tokens, mask))
        # The mask, not luck: padding rewritten, every image token's output is the same, bit for bit.
        assert torch.equal(model(x, t, Condition(changed, mask)), out)
        # Without the mask the same change reaches the image tokens ...
        assert not torch.allclose(model(x, t, changed), model(x, t, tokens), atol=1e-3)
        # ... and with it a real text token does.
        real = tokens.clone()
        real[0, 4] = torch.randn(8)
        assert not torch.allclose(model(x, t, Condition(real, mask))[0], out[0], atol=1e-4)


def test_image_attention_weights_on_padding_are_zero():
    """The joint softmax itself: image queries put weight 0 on padded text keys (and > 0 on real ones)."""
    model = _joint(attention_backend="math")
    tokens, mask = _padded()
    block = model.blocks[0]
    captured = {}

    def capture(module, args, kwargs, out):
        captured["q"], captured["k"], captured["mask"] = args[0], args[1], kwargs["key_padding_mask"]

    import unizoo.components.generators.joint_attention as joint

    original = joint.attention

    def spy(q, k, v, key_padding_mask=None, backend="auto"):
        captured.update(q=q, k=k, mask=key_padding_mask)
        return original(q, k, v, key_padding_mask=key_padding_mask, backend=backend)

    joint.attention = spy
    try:
        with torch.no_grad():
            block(model.x_embedder(torch.randn(2, 16, 4)), torch.randn(2, 32), model.cond_embedder(tokens), mask)
    finally:
        joint.attention = original
    q, k, key_mask = captured["q"], captured["k"], captured["mask"]
    assert key_mask.shape == (2, 6 + 16) and key_mask[:, 6:].all() and torch.equal(key_mask[:, :6], mask)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    weights = scores.masked_fill(~key_mask[:, None, None, :], float("-inf")).softmax(-1)
    image_to_text = weights[:, :, 6:, :6]  # image queries, text keys
    assert torch.equal(image_to_text[0, :, :, :3], torch.zeros_like(image_to_text[0, :, :, :3]))
    assert (image_to_text[0, :, :, 3:] > 0).all() and (image_to_text[1] > 0).all()


def test_the_text_stream_flows_through_the_blocks():
    model = _joint()
    tokens, mask = _padded()
    seen = []
    for block in model.blocks:
        block.norm_text.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        model(torch.randn(2, 16, 4), torch.rand(2), Condition(tokens, mask))
    assert torch.equal(seen[0], model.cond_embedder(tokens))  # the first block reads the condition ...
    assert not torch.allclose(seen[1], seen[0])  # ... the second what the first made of it


def test_same_parameters_as_the_cross_attention_block():
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    for adaln in ("zero", "single"):
        assert count(JointDiTBlock(48, 4, adaln=adaln)) == count(DiTBlock(48, 4, adaln=adaln))


def test_fresh_joint_model_outputs_exact_zeros_and_learns():
    torch.manual_seed(0)
    model = dit("tiny", token_dim=4, num_tokens=16, condition_dim=8, depth=2, hidden_size=32, num_heads=2,
                condition_attention="joint")
    tokens, mask = _padded()
    x, t = torch.randn(2, 16, 4), torch.rand(2)
    assert torch.equal(model(x, t, Condition(tokens, mask)), torch.zeros_like(x))
    target = torch.randn_like(x)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(model(x, t, Condition(tokens, mask)), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_joint_attention_refuses_layered_conditions_and_unknown_modes():
    model = _joint()
    with pytest.raises(ValueError, match="one text stream"):
        model(torch.randn(2, 16, 4), torch.rand(2), torch.randn(2, 3, 6, 8))
    with pytest.raises(ValueError, match=r"generator.condition_attention='mm'; valid choices: cross, joint"):
        dit("tiny", token_dim=4, num_tokens=16, condition_dim=8, condition_attention="mm")
