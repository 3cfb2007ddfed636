"""DiT generator: shapes, adaLN-Zero / adaLN-single init, presets, backends, CFG dropping, learning."""

import pytest
import torch

from unizoo.components.generators.dit import DIT_SIZES, DiT, dit, sincos_pos_embed

# Original DiT parameter counts (patch size 2, class-conditional), in millions.
ORIGINAL_DIT_M = {"S": 33.0, "B": 130.5, "L": 458.0, "XL": 675.1}


def _small(**kw):
    cfg = dict(token_dim=4, num_tokens=16, condition_dim=24, depth=2, hidden_size=64, num_heads=4)
    return dit("tiny", **{**cfg, **kw})


def _inputs(model, B=3, Q=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, model.num_tokens, model.token_dim, generator=g)
    t = torch.rand(B, generator=g)
    cond = torch.randn(B, Q, model.condition_dim, generator=g)
    mask = torch.rand(B, Q, generator=g) > 0.3
    mask[:, 0] = True
    return x, t, cond, mask


def _randomise(model, seed=0):
    """Overwrite every parameter (zero-inits included) so the output is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("num_tokens,token_dim", [(16, 4), (64, 4), (10, 8), (1, 3)])
def test_output_shape(num_tokens, token_dim):
    model = _randomise(_small(num_tokens=num_tokens, token_dim=token_dim))
    x, t, cond, mask = _inputs(model)
    out = model(x, t, cond, mask)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    assert model(x, t, cond).shape == x.shape  # mask is optional


def test_position_embedding_2d_when_square_else_1d():
    square, line = sincos_pos_embed(16, 8), sincos_pos_embed(10, 8)
    assert square.shape == (1, 16, 8) and line.shape == (1, 10, 8)
    # 2-D: tokens in the same grid row share the first (row) half of the channels.
    torch.testing.assert_close(square[0, 0, :4], square[0, 3, :4])
    assert not torch.allclose(square[0, 0, :4], square[0, 4, :4])
    model = _small()
    assert "pos_embed" not in model.state_dict()  # fixed, non-persistent buffer


@pytest.mark.parametrize("adaln", ["zero", "single"])
def test_fresh_model_outputs_exact_zeros(adaln):
    torch.manual_seed(0)
    model = dit("tiny", token_dim=4, num_tokens=64, condition_dim=32, adaln=adaln)
    x, t, cond, mask = _inputs(model)
    assert torch.equal(model(x, t, cond, mask), torch.zeros_like(x))


def test_presets_build_and_grow():
    model = dit("tiny", token_dim=4, num_tokens=256, condition_dim=128)
    assert len(model.blocks) == 4 and model.hidden_size == 128
    counts = {"tiny": sum(p.numel() for p in model.parameters())}
    for size, cfg in DIT_SIZES.items():
        if size not in ORIGINAL_DIT_M:  # unizoo's own presets: built for real below
            continue
        with torch.device("meta"):  # no memory for the big ones
            m = dit(size, token_dim=4, num_tokens=256, condition_dim=cfg["hidden_size"])
        assert len(m.blocks) == cfg["depth"] and m.hidden_size == cfg["hidden_size"]
        assert m.blocks[0].attn.num_heads == cfg["num_heads"]
        counts[size] = sum(p.numel() for p in m.parameters())
        # Cross-attention adds ~4h² to DiT's ~18h² per block: about 1.22x the original.
        assert 1.1 < counts[size] / 1e6 / ORIGINAL_DIT_M[size] < 1.35, (size, counts[size])
    deep = dit("tiny_deep", token_dim=4, num_tokens=256, condition_dim=128)
    assert len(deep.blocks) == 8 and deep.hidden_size == 128
    counts["tiny_deep"] = sum(p.numel() for p in deep.parameters())
    sizes = list(DIT_SIZES)
    assert all(counts[a] < counts[b] for a, b in zip(sizes, sizes[1:]))


def test_overrides_win_over_preset():
    model = dit("S", token_dim=4, num_tokens=16, condition_dim=8, depth=1, hidden_size=32, num_heads=2)
    assert len(model.blocks) == 1 and model.hidden_size == 32 and model.num_heads == 2


def test_unknown_preset_lists_sizes():
    with pytest.raises(ValueError) as err:
        dit("XXL", token_dim=4, num_tokens=16, condition_dim=8)
    assert all(size in str(err.value) for size in DIT_SIZES)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="flash"):
        _small(attention_backend="flash")
    with pytest.raises(ValueError, match="divisible"):
        _small(hidden_size=30, num_heads=4)
    model = _small()
    x, t, cond, _ = _inputs(model)
    with pytest.raises(ValueError, match="x must be"):
        model(x[:, :8], t, cond)


def test_sdpa_and_math_backends_agree():
    model = _randomise(_small(attention_backend="sdpa"))
    x, t, cond, mask = _inputs(model)
    with torch.no_grad():
        out_sdpa = model(x, t, cond, mask)
        model.set_attention_backend("math")
        out_math = model(x, t, cond, mask)
    assert out_sdpa.abs().mean() > 1e-2  # not trivially zero
    torch.testing.assert_close(out_sdpa, out_math, atol=1e-5, rtol=1e-5)


def test_masked_condition_tokens_are_ignored():
    model = _randomise(_small())
    x, t, cond, mask = _inputs(model)
    cond2 = cond.clone()
    cond2[~mask] = 50 * torch.randn_like(cond2[~mask])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, cond2, mask), model(x, t, cond, mask), atol=1e-5, rtol=0)
        # ... while real tokens, and t, do matter.
        assert not torch.allclose(model(x, t, cond2), model(x, t, cond))
        assert not torch.allclose(model(x, t.flip(0), cond, mask), model(x, t, cond, mask))


def test_drop_condition_replaces_exactly_dropped_rows():
    model = _small()
    cond = torch.randn(4, 5, model.condition_dim)
    drop = torch.tensor([True, False, True, False])
    out = model.drop_condition(cond, drop)
    null = model.null_condition.detach()[0].expand(5, -1)
    assert torch.equal(out[0], null) and torch.equal(out[2], null)
    assert torch.equal(out[1], cond[1]) and torch.equal(out[3], cond[3])
    # The null token is learned: gradients reach it only through dropped rows.
    model.drop_condition(cond, drop).sum().backward()
    assert model.null_condition.grad.abs().sum() > 0


@pytest.mark.parametrize("adaln", ["zero", "single"])
def test_overfits_a_fixed_batch(adaln):
    torch.manual_seed(0)
    model = _small(depth=2, hidden_size=64, adaln=adaln)
    x, t, cond, mask = _inputs(model, B=8)
    target = torch.randn_like(x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(200):
        loss = (model(x, t, cond, mask) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_gradient_checkpointing_matches():
    model = _randomise(_small())
    x, t, cond, mask = _inputs(model)

    def run(flag):
        model.gradient_checkpointing = flag
        model.zero_grad()
        out = model(x, t, cond, mask)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    out_plain, grads_plain = run(False)
    out_ckpt, grads_ckpt = run(True)
    torch.testing.assert_close(out_ckpt, out_plain, atol=0, rtol=0)
    assert len(grads_ckpt) == len(grads_plain) > 0
    for g_ckpt, g_plain in zip(grads_ckpt, grads_plain):
        torch.testing.assert_close(g_ckpt, g_plain, atol=1e-7, rtol=1e-5)


def test_is_a_module_built_from_keywords():
    # Recipes instantiate `unizoo.components.generators.dit.dit` with keywords only.
    assert isinstance(dit(token_dim=4, num_tokens=4, condition_dim=8), DiT)


def test_aligned_condition_gives_condition_tokens_a_place():
    # Cross-attention and the pooled summary ignore the order of condition tokens;
    # an aligned condition adds token i to token i, so its order matters.
    for aligned, order_matters in ((False, False), (True, True)):
        model = _randomise(_small(num_tokens=16, condition_dim=8, aligned_condition=aligned))
        x, t = torch.randn(2, 16, 4), torch.rand(2)
        cond = torch.randn(2, 16, 8)
        flipped = cond.flip(1)
        changed = (model(x, t, cond) - model(x, t, flipped)).abs().max().item() > 1e-4
        assert changed == order_matters
    with pytest.raises(ValueError, match="one condition token per token"):
        _small(num_tokens=16, condition_dim=8, aligned_condition=True)(x, t, torch.randn(2, 5, 8))


@pytest.mark.parametrize("masked", [False, True])
def test_single_token_condition_shortcut_matches_full_attention(masked):
    # A one-token condition skips the attention (softmax over one key is 1); the
    # output and every gradient but the unused query projection's must not change.
    model = _randomise(_small(attention_backend="math"))
    x, t, cond, _ = _inputs(model, Q=1)
    mask = torch.tensor([[True], [False], [True]]) if masked else None

    def run(cond, mask):
        model.zero_grad()
        out = model(x, t, cond, mask)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out_short, grads_short = run(cond, mask)
    # Two copies of the token are the same condition, but take the general attention path.
    out_full, grads_full = run(cond.expand(-1, 2, -1), None if mask is None else mask.expand(-1, 2))
    assert out_short.abs().mean() > 1e-2
    torch.testing.assert_close(out_short, out_full, atol=1e-5, rtol=1e-5)
    # The query side (its pre-norm and projection) cannot change the output: the full
    # path gives it zero gradient, the shortcut none at all.
    unused = {n for n in grads_full if ".cross_attn.q." in n or ".norm_cross." in n}
    assert unused and set(grads_short) == set(grads_full) - unused
    assert all(grads_full[name].abs().max() < 1e-6 for name in unused)
    for name, grad in grads_short.items():
        torch.testing.assert_close(grad, grads_full[name], atol=1e-5, rtol=1e-4, msg=name)


def test_fused_adaln_ops_match_their_formulas():
    from unizoo.components.generators.dit_blocks import gated_residual, modulate

    g = torch.Generator().manual_seed(0)
    x, branch = torch.randn(2, 2, 5, 8, generator=g)
    shift, scale, gate = torch.randn(3, 2, 8, generator=g)
    torch.testing.assert_close(modulate(x, shift, scale), x * (1 + scale[:, None]) + shift[:, None])
    torch.testing.assert_close(gated_residual(x, gate, branch), x + gate[:, None] * branch)


@pytest.mark.parametrize("autocast", [False, True])
def test_compiles_to_one_graph(autocast):
    # "auto" attention resolves (and logs) at trace time: no graph break per block.
    torch._dynamo.reset()
    model = _small(attention_backend="auto")
    x, t, cond, mask = _inputs(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        explanation = torch._dynamo.explain(model)(x, t, cond, mask)
    assert explanation.graph_break_count == 0, [str(r.reason)[:200] for r in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_adaln_single_shares_one_projection():
    # adaLN-single (PixArt-alpha): one Linear(C, 6C) for the model, a (6, C) table per
    # block, in place of a Linear(C, 6C) per block: depth - 1 fewer such Linears.
    C, depth = 64, 3
    zero, single = (_small(depth=depth, hidden_size=C, adaln=mode) for mode in ("zero", "single"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    per_linear = C * 6 * C + 6 * C
    assert count(zero) - count(single) == (depth - 1) * per_linear - depth * 6 * C
    assert all(hasattr(b, "scale_shift_table") and not hasattr(b, "adaLN_modulation") for b in single.blocks)
    # adaLN-Zero keeps the parameter names of checkpoints written before the option existed.
    assert "blocks.0.adaLN_modulation.1.weight" in zero.state_dict()
    assert not any("scale_shift_table" in name or "shared_modulation" in name for name in zero.state_dict())
    with pytest.raises(ValueError, match="zero.*single"):
        _small(adaln="pixart")


def test_adaln_single_modulation_is_table_plus_shared_projection():
    model = _randomise(_small(adaln="single"))
    block = model.blocks[1]
    c = torch.randn(3, 6 * model.hidden_size)
    shift_msa, scale_msa, gate_msa, *_, gate_mlp = block.modulation(c)
    expected = c.view(3, 6, -1) + block.scale_shift_table
    torch.testing.assert_close(shift_msa, expected[:, 0])
    torch.testing.assert_close(gate_msa, expected[:, 2])
    torch.testing.assert_close(gate_mlp, expected[:, 5])
    # Under bf16 autocast the fp32 table must not promote the modulation back to fp32.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(v.dtype == torch.bfloat16 for v in block.modulation(c.bfloat16()))


@pytest.mark.parametrize("adaln", ["zero", "single"])
def test_every_modulation_parameter_learns(adaln):
    # From the zero init, a few steps must move every gate and table (no dead branch).
    torch.manual_seed(0)
    model = _small(adaln=adaln)
    x, t, cond, mask = _inputs(model, B=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        loss = (model(x, t, cond, mask) - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    modulation = [n for n in before if "adaLN" in n or "scale_shift_table" in n or "shared_modulation" in n]
    assert modulation
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in modulation)


def test_tanh_gelu_is_the_tanh_approximation_eager_and_compiled():
    """Eager: nn.GELU(approximate="tanh") exactly. Compiled: its sigmoid form, the same function."""
    from unizoo.components.generators.dit_blocks import TanhGELU

    x = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(0)) * 3
    reference = torch.nn.GELU(approximate="tanh")
    assert torch.equal(TanhGELU()(x), reference(x))
    compiled = torch.compile(TanhGELU(), backend="aot_eager", fullgraph=True)
    for dtype, tolerance in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
        mine, theirs = (x.to(dtype).clone().requires_grad_() for _ in range(2))
        out, expected = compiled(mine), reference(theirs)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), expected.float(), atol=tolerance, rtol=tolerance)
        out.float().pow(2).sum().backward()
        expected.float().pow(2).sum().backward()
        torch.testing.assert_close(mine.grad.float(), theirs.grad.float(), atol=tolerance * 100, rtol=tolerance * 10)
    torch._dynamo.reset()
