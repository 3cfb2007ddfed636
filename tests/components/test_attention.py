"""attention(): every backend agrees with the fp32 reference, masks and layout included."""

import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from unizoo.components.generators import attention as attn_mod
from unizoo.components.generators.attention import BACKENDS, attention
from unizoo.components.generators.dit import dit
from unizoo.errors import RecipeError

# (B, Mq, Mk, H, K): self-attention (Mq == Mk) and cross-attention, Mk not a multiple of 8.
SHAPES = [(2, 16, 16, 4, 8), (3, 10, 10, 2, 16), (2, 7, 13, 3, 8), (1, 32, 5, 1, 4)]


def _qkv(B, Mq, Mk, H, K, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, M, H, K, generator=g) for M in (Mq, Mk, Mk))
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def _mask(B, Mk, seed=0):
    """Random key padding mask with at least one valid key per row."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, Mk, generator=g) > 0.4
    mask[:, 0] = True
    return mask


def _einsum_reference(q, k, v, mask=None):
    """Independent per-head reference written directly in [B, M, H, K]."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double()).float()


@pytest.fixture(autouse=True)
def _reset_log_once():
    attn_mod._logged_choices.clear()
    yield
    attn_mod._logged_choices.clear()


@pytest.mark.parametrize("backend", ["sdpa", "gemm"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_backend_matches_math(backend, shape, masked):
    q, k, v = _qkv(*shape)
    mask = _mask(shape[0], shape[2]) if masked else None
    ref = attention(q, k, v, mask, backend="math")
    out = attention(q, k, v, mask, backend=backend)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_gemm_in_bf16_matches_math_forward_and_backward(masked):
    # gemm keeps bf16 end to end; its error must stay at bf16 rounding, gradients included.
    shape = (2, 64, 64, 3, 32)
    mask = _mask(shape[0], shape[2]) if masked else None
    runs = {}
    for backend in ("math", "gemm"):
        q, k, v = (t.requires_grad_() for t in _qkv(*shape, dtype=torch.bfloat16))
        out = attention(q, k, v, mask, backend=backend)
        out.float().square().sum().backward()
        assert out.dtype == torch.bfloat16
        runs[backend] = [out, q.grad, k.grad, v.grad]
    for got, want in zip(runs["gemm"], runs["math"]):
        torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("backend", ["math", "sdpa", "gemm"])
@pytest.mark.parametrize("masked", [False, True])
def test_layout_matches_einsum_reference(backend, masked):
    B, Mq, Mk, H, K = 2, 5, 9, 3, 8
    q, k, v = _qkv(B, Mq, Mk, H, K, seed=1)
    mask = _mask(B, Mk, seed=1) if masked else None
    out = attention(q, k, v, mask, backend=backend)
    assert out.shape == (B, Mq, H, K)
    torch.testing.assert_close(out, _einsum_reference(q, k, v, mask), atol=1e-5, rtol=1e-5)
    # Heads are independent: perturbing head 0 of k leaves the other heads' outputs alone.
    k2 = k.clone()
    k2[:, :, 0] = torch.randn_like(k2[:, :, 0])  # (a constant shift would cancel in softmax)
    out2 = attention(q, k2, v, mask, backend=backend)
    torch.testing.assert_close(out2[:, :, 1:], out[:, :, 1:])
    assert not torch.allclose(out2[:, :, 0], out[:, :, 0])


def test_value_dim_may_differ_from_key_dim():
    q, k, _ = _qkv(2, 6, 7, 2, 8)
    v = torch.randn(2, 7, 2, 5)
    out = attention(q, k, v, backend="math")
    assert out.shape == (2, 6, 2, 5)
    torch.testing.assert_close(attention(q, k, v, backend="sdpa"), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["math", "sdpa", "gemm"])
def test_masked_keys_have_no_influence(backend):
    B, Mq, Mk, H, K = 3, 6, 11, 2, 8
    q, k, v = _qkv(B, Mq, Mk, H, K, seed=2)
    mask = _mask(B, Mk, seed=2)
    out = attention(q, k, v, mask, backend=backend)
    k2, v2 = k.clone(), v.clone()
    k2[~mask] = 100 * torch.randn_like(k2[~mask])
    v2[~mask] = 100 * torch.randn_like(v2[~mask])
    torch.testing.assert_close(attention(q, k2, v2, mask, backend=backend), out, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", ["math", "sdpa", "gemm"])
def test_fully_masked_row_is_zero_not_nan(backend):
    q, k, v = _qkv(2, 4, 6, 2, 8, seed=3)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1] = False
    out = attention(q, k, v, mask, backend=backend)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[0], _einsum_reference(q[:1], k[:1], v[:1])[0], atol=1e-5, rtol=0)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert q.grad[1].abs().max() == 0


def _fake_xformers_op(calls):
    """Stand-in for memory_efficient_attention: takes [B, M, H, K] and an additive bias."""

    def op(q, k, v, attn_bias=None):
        B, Mq, H, _ = q.shape
        Mk = k.shape[1]
        if attn_bias is not None:
            assert attn_bias.shape == (B, H, Mq, Mk)
            assert attn_bias.dtype == q.dtype
            assert attn_bias.stride(-2) % 8 == 0, "last dim must be allocated padded to 8"
        calls.append(attn_bias)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_bias
        )
        return out.transpose(1, 2)

    return op


@pytest.fixture
def fake_xformers(monkeypatch):
    calls = []
    monkeypatch.setattr(attn_mod, "_xformers_op", lambda: _fake_xformers_op(calls))
    monkeypatch.setattr(attn_mod, "_xformers_unusable_reason", lambda q: None)
    return calls


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_xformers_glue_matches_math(fake_xformers, shape, masked):
    q, k, v = _qkv(*shape, seed=4)
    mask = _mask(shape[0], shape[2], seed=4) if masked else None
    out = attention(q, k, v, mask, backend="xformers")
    assert len(fake_xformers) == 1 and (fake_xformers[0] is None) == (not masked)
    torch.testing.assert_close(out, attention(q, k, v, mask, backend="math"), atol=1e-5, rtol=1e-5)


def test_xformers_bias_is_minus_inf_at_masked_keys():
    q = torch.zeros(2, 3, 4, 8)
    mask = _mask(2, 13, seed=5)
    bias = attn_mod._xformers_bias(mask, q)
    assert bias.shape == (2, 4, 3, 13) and bias.stride(-2) == 16
    expected = torch.zeros(2, 13).masked_fill(~mask, float("-inf"))
    assert torch.equal(bias, expected[:, None, None, :].expand(2, 4, 3, 13))


def test_auto_picks_xformers_when_usable(fake_xformers, caplog):
    caplog.set_level(logging.INFO, logger="unizoo.attention")
    q, k, v = _qkv(1, 4, 4, 1, 8)
    attention(q, k, v, backend="auto")
    attention(q, k, v, backend="auto")
    # One probe (a masked forward, held to sdpa), then the two calls: the probe is not repeated.
    assert len(fake_xformers) == 3 and fake_xformers[0] is not None and fake_xformers[1:] == [None, None]
    assert "auto -> xformers" in caplog.text


class _BrokenXformers(types.ModuleType):
    """An installed xformers whose kernels did not load: what a wheel built for another torch gives."""

    def __init__(self) -> None:
        super().__init__("xformers")
        self.__version__ = "0.0.35"
        build = types.SimpleNamespace(torch_version="2.10.0+cu128")
        self._cpp_lib = types.SimpleNamespace(_cpp_library_load_exception=types.SimpleNamespace(build_info=build))


def _raising_op(*args, **kwargs):
    raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs: ...")


@pytest.fixture
def broken_xformers(monkeypatch):
    """xformers imports and its tensors are on a device it claims, but its op raises as a mismatched wheel's does."""
    monkeypatch.setitem(sys.modules, "xformers", _BrokenXformers())
    monkeypatch.setattr(attn_mod, "_xformers_op", lambda: _raising_op)
    monkeypatch.setattr(attn_mod, "_xformers_unusable_reason", lambda device: None)


def test_auto_falls_back_to_sdpa_when_the_xformers_kernel_raises(broken_xformers, caplog):
    caplog.set_level(logging.INFO, logger="unizoo.attention")
    q, k, v = _qkv(2, 6, 5, 2, 8, seed=7)
    mask = _mask(2, 5, seed=7)
    out = attention(q, k, v, mask, backend="auto")
    torch.testing.assert_close(out, attention(q, k, v, mask, backend="sdpa"), atol=0, rtol=0)
    expected = (f"attention backend: auto -> sdpa (xformers 0.0.35 cannot run here: its kernels did not load "
                f"(built for torch 2.10.0+cu128, this is {torch.__version__}); using sdpa)")
    assert [r.getMessage() for r in caplog.records if r.name == "unizoo.attention"] == [expected]


def test_auto_falls_back_to_sdpa_when_the_xformers_kernel_is_wrong(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="unizoo.attention")
    calls = []

    def off_by_a_tenth(q, k, v, attn_bias=None):
        return _fake_xformers_op(calls)(q, k, v, attn_bias) * 1.1

    monkeypatch.setattr(attn_mod, "_xformers_op", lambda: off_by_a_tenth)
    monkeypatch.setattr(attn_mod, "_xformers_unusable_reason", lambda device: None)
    q, k, v = _qkv(1, 4, 4, 1, 8)
    out = attention(q, k, v, backend="auto")
    assert len(calls) == 1  # the probe's; the call itself ran sdpa
    torch.testing.assert_close(out, attention(q, k, v, backend="sdpa"), atol=0, rtol=0)
    message = caplog.records[-1].getMessage()
    assert message.startswith("attention backend: auto -> sdpa (xformers returns wrong numbers here: its output or gradients differ from sdpa's by up to ")
    assert message.endswith(" of their scale in float32 (tolerance 0.005); using sdpa)")


def test_the_probe_runs_once_per_device_dtype_and_head_dim(fake_xformers):
    for head_dim, dtype in ((8, torch.float32), (8, torch.float32), (16, torch.float32), (8, torch.float64)):
        assert attn_mod.probe("xformers", "cpu", dtype, head_dim) is None
    assert len(fake_xformers) == 3


def test_explicit_xformers_is_refused_when_the_model_is_built(broken_xformers):
    with pytest.raises(attn_mod.AttentionUnavailable) as refused:
        dit("tiny", token_dim=4, num_tokens=16, condition_dim=8, attention_backend="xformers")
    assert str(refused.value) == (
        "generator.attention_backend=xformers cannot run on cpu in float32: xformers 0.0.35 cannot run here: its kernels "
        f"did not load (built for torch 2.10.0+cu128, this is {torch.__version__}). Use generator.attention_backend=auto "
        "(it falls back to sdpa where xformers cannot run) or sdpa or install xformers and torch from one index "
        "(pip install 'unizoo[xformers]', README: On a GPU)."
    )
    assert isinstance(refused.value, RecipeError)  # the CLI's exit status 2, one paragraph


def test_auto_picks_sdpa_on_cpu_and_logs_once(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="unizoo.attention")
    called = []
    monkeypatch.setattr(attn_mod, "_KERNELS", {**attn_mod._KERNELS, "sdpa": lambda *a: called.append(1) or a[0]})
    q, k, v = _qkv(1, 4, 4, 1, 8)
    attention(q, k, v, backend="auto")
    attention(q, k, v, backend="auto")
    assert called == [1, 1]
    records = [r for r in caplog.records if r.name == "unizoo.attention"]
    assert len(records) == 1
    assert records[0].getMessage().startswith("attention backend: auto -> sdpa (")


def test_auto_picks_gemm_for_bf16_on_cpu_up_to_a_size(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="unizoo.attention")
    called = []
    kernels = {name: (lambda name: lambda q, *a: called.append(name) or q)(name) for name in attn_mod._KERNELS}
    monkeypatch.setattr(attn_mod, "_KERNELS", kernels)
    monkeypatch.setattr(attn_mod, "GEMM_MAX_SCORES", 64 * 64)
    # The choice by size and dtype alone: the stand-in kernels are not held to sdpa here (the probe tests are).
    monkeypatch.setattr(attn_mod, "probe", lambda backend, *args: None if backend == "gemm" else "xformers not installed")
    for dtype, M in ((torch.bfloat16, 64), (torch.float32, 64), (torch.bfloat16, 65)):
        attention(*_qkv(1, M, M, 1, 8, dtype=dtype), backend="auto")
    assert called == ["gemm", "sdpa", "sdpa"]
    assert "auto -> gemm (" in caplog.text


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_keeps_one_graph_when_the_key_length_is_dynamic(monkeypatch, dtype):
    """Under torch.compile with a symbolic key length (captions of several lengths), auto resolves in the graph.

    The choice used to take the lengths themselves, which dynamo cannot fold into a constant: the graph broke
    at every attention call. On the CPU in bf16 the size rule becomes a guard: past it, a recompile takes sdpa.
    """
    import torch._dynamo as dynamo

    called = []
    kernels = {name: (lambda name: lambda q, *a: called.append(name) or q * 1)(name) for name in attn_mod._KERNELS}
    monkeypatch.setattr(attn_mod, "_KERNELS", kernels)
    monkeypatch.setattr(attn_mod, "GEMM_MAX_SCORES", 16 * 20)
    monkeypatch.setattr(attn_mod, "probe", lambda backend, *args: None if backend == "gemm" else "xformers not installed")

    def step(q, k, v, mask):
        return attention(q, k, v, mask, backend="auto") * 2

    dynamo.reset()
    try:
        q, k, v = _qkv(2, 16, 12, 2, 8, dtype=dtype)
        mask = torch.ones(2, 12, dtype=torch.bool)
        for tensor in (k, v, mask):
            dynamo.maybe_mark_dynamic(tensor, 1)
        explained = dynamo.explain(step)(q, k, v, mask)
        assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
        compiled = torch.compile(step, backend="eager", dynamic=True)
        for keys in (12, 20, 21):  # 16 x 21 scores per head are past the (patched) gemm limit
            q, k, v = _qkv(2, 16, keys, 2, 8, dtype=dtype)
            called.clear()
            compiled(q, k, v, torch.ones(2, keys, dtype=torch.bool))
            expected = "gemm" if dtype == torch.bfloat16 and keys <= 20 else "sdpa"
            assert called == [expected], (dtype, keys, called)
    finally:
        dynamo.reset()


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_gemm_reason_claims_a_measurement_only_where_bf16_is_native(monkeypatch, native_bf16):
    monkeypatch.setattr(attn_mod, "probe", lambda backend, *args: None if backend == "gemm" else "xformers not installed")
    monkeypatch.setattr(attn_mod, "cpu_computes_bf16", lambda: native_bf16)
    chosen, reason = attn_mod.auto_backend(torch.device("cpu"), torch.bfloat16, 64, 64, 16)
    assert chosen == "gemm"
    assert reason.startswith("xformers not installed; bf16 on the CPU at short sequences: one matrix product")
    assert reason.endswith("beats the flash kernel") is native_bf16
    assert reason.endswith("(this CPU emulates bf16: not measured here)") is not native_bf16


def test_explicit_xformers_on_cpu_raises(monkeypatch):
    q, k, v = _qkv(1, 4, 4, 1, 8)
    # Real environment: xformers missing, or present but these tensors are on CPU.
    with pytest.raises(RuntimeError, match="xformers.*unusable.*sdpa"):
        attention(q, k, v, backend="xformers")
    # Installed but on CPU: the message names the device problem.
    monkeypatch.setattr(attn_mod, "_xformers_op", lambda: _fake_xformers_op([]))
    with pytest.raises(RuntimeError, match="needs CUDA"):
        attention(q, k, v, backend="xformers")


def test_explicit_xformers_not_installed_raises(monkeypatch):
    def missing():
        raise ImportError("No module named 'xformers'")

    monkeypatch.setattr(attn_mod, "_xformers_op", missing)
    q, k, v = _qkv(1, 4, 4, 1, 8)
    with pytest.raises(RuntimeError, match="not installed"):
        attention(q, k, v, backend="xformers")


def test_xformers_that_fails_to_import_with_another_error_is_unusable_not_a_crash(monkeypatch):
    # A wheel built for another torch or CUDA usually imports and fails at its first call (the probe's case), but
    # it can also fail to import at all, with an error other than ImportError.
    def broken():
        raise OSError("libxformers.so: undefined symbol: _ZN3c104cuda9SetDeviceEa\nmore lines")

    monkeypatch.setattr(attn_mod, "_xformers_op", broken)
    assert attn_mod._xformers_unusable_reason(torch.device("cuda")) == (
        "xformers failed to import (OSError: libxformers.so: undefined symbol: _ZN3c104cuda9SetDeviceEa)")
    q, k, v = _qkv(1, 4, 4, 1, 8)
    assert attention(q, k, v, backend="auto").shape == q.shape  # auto takes another kernel
    with pytest.raises(RuntimeError, match=r"failed to import \(OSError: libxformers.so"):
        attention(q, k, v, backend="xformers")


def test_unknown_backend_names_the_choices():
    q, k, v = _qkv(1, 4, 4, 1, 8)
    with pytest.raises(ValueError) as err:
        attention(q, k, v, backend="flash")
    assert all(name in str(err.value) for name in BACKENDS)


def test_bad_shapes_raise():
    q, k, v = _qkv(1, 4, 4, 1, 8)
    with pytest.raises(ValueError, match=r"\[B, M, H, K\]"):
        attention(q[0], k[0], v[0], backend="math")
    with pytest.raises(ValueError, match="key_padding_mask"):
        attention(q, k, v, torch.ones(1, 5, dtype=torch.bool), backend="math")


def _xformers_available():
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.cuda
@pytest.mark.skipif(
    not (torch.cuda.is_available() and _xformers_available()), reason="needs CUDA and xformers"
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_real_xformers_matches_math(dtype, masked):
    B, Mq, Mk, H, K = 2, 64, 77, 4, 64
    q, k, v = _qkv(B, Mq, Mk, H, K, seed=6, dtype=dtype, device="cuda")
    mask = _mask(B, Mk, seed=6).cuda() if masked else None
    out = attention(q, k, v, mask, backend="xformers")
    ref = attention(q, k, v, mask, backend="math")
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
