"""Multi-head attention as one function with selectable kernels.

Every generator calls :func:`attention` instead of a specific kernel so the kernel
becomes a config choice (``attention_backend``) that benchmarks can sweep without
touching model code.

Layout: q, k, v and the output are ``[B, M, H, K]`` (batch, sequence, heads, head
dim), which is xformers' native layout. It is also what a fused projection followed
by ``.view(B, M, H, K)`` produces, so models never transpose themselves.

Backends (``BACKENDS``):

* ``"math"``     - plain softmax(q kᵀ / sqrt(K)) v in fp32; the reference the others
                   are tested against. Materialises the full ``[B, H, Mq, Mk]`` scores.
* ``"sdpa"``     - ``torch.nn.functional.scaled_dot_product_attention`` (flash /
                   memory-efficient / cpu kernels picked by PyTorch).
* ``"xformers"`` - ``xformers.ops.memory_efficient_attention``; CUDA only, optional
                   dependency (``pip install unizoo[xformers]``).
* ``"gemm"``     - the same two products as ``math`` as batched matrix multiplies in
                   the input dtype (softmax accumulates in fp32 inside the op). In bf16
                   on a CPU with AMX these run on the matrix units, where the CPU flash
                   kernel does not: 3x faster forward + backward at 256 tokens
                   (``benchmarks/results/*/attention.md``). Materialises the scores.
* ``"auto"``     - xformers where it imports, the tensors are on CUDA and its kernel passes
                   the probe; on the CPU in bf16 with at most ``GEMM_MAX_SCORES`` scores per
                   head, gemm (probed too); else sdpa. The choice and its reason are logged once.

The probe. A kernel that imports is not a kernel that runs: an xformers wheel built for
another torch or CUDA imports, prints a warning, and raises ``NotImplementedError`` at
the first call (the most common way xformers is installed). So before ``auto`` commits
to a kernel other than sdpa, it runs it once per (device, dtype, head dim): a tiny
forward and backward in the real ``[B, M, H, K]`` layout, with a padded key, held to
sdpa within ``PROBE_TOLERANCE``. Any failure, an exception or wrong numbers, sends it to
sdpa with one log line that says why, naming the versions. An explicit ``"xformers"``
runs the same probe (``require_backend``) when a DiT is built, so a run that asks for
it and cannot have it stops before anything trains.

Key padding: ``key_padding_mask`` is bool ``[B, Mk]``, True = the key takes part.
A batch row whose keys are *all* masked has nothing to attend to; softmax over an
empty set is undefined (NaN in every kernel), so such rows return exactly 0 in all
backends, with zero (not NaN) gradients.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from unizoo.errors import RecipeError
from unizoo.runtime.precision import cpu_computes_bf16

BACKENDS = ("auto", "xformers", "sdpa", "gemm", "math")
# "auto" takes gemm on the CPU in bf16 up to this many scores per (batch, head): up to
# 1024 x 1024 it measured faster than the flash kernel, and the materialised bf16
# scores stay small (2 MiB per head).
GEMM_MAX_SCORES = 1024 * 1024

logger = logging.getLogger("unizoo.attention")

# Messages already logged by "auto": the choice is the same for every call of a run,
# so logging it per call would flood the logs (attention runs ~depth times a step).
_logged_choices: set[str] = set()


class AttentionUnavailable(RecipeError):
    """An attention kernel the recipe names explicitly cannot run here (exit status 2, before training)."""


def check_backend(backend: str) -> str:
    """Return ``backend`` if it is a known name, else raise ``ValueError`` listing them."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    return backend


def _xformers_op():
    """Return ``xformers.ops.memory_efficient_attention`` (ImportError if missing).

    Imported lazily so this module, and every model using it, works without
    xformers; a separate function so tests can substitute the op.
    """
    import xformers.ops  # noqa: PLC0415 - optional dependency

    return xformers.ops.memory_efficient_attention


# Why importing xformers failed (None: it imported), per loader function (tests substitute it): keyed by the
# function itself, not its id, which a freed function's successor may reuse.
_xformers_import_errors: dict[object, str | None] = {}


@torch.compiler.assume_constant_result
def _xformers_missing() -> bool:
    key = _xformers_op
    if key not in _xformers_import_errors:
        try:
            _xformers_op()
            _xformers_import_errors[key] = None
        except ImportError:
            _xformers_import_errors[key] = "xformers not installed"
        except Exception as error:  # noqa: BLE001 - a wheel built for another torch can fail to import at all
            first_line = (str(error).strip().splitlines() or [""])[0][:200]
            _xformers_import_errors[key] = f"xformers failed to import ({type(error).__name__}: {first_line})"
    return _xformers_import_errors[key] is not None


def _xformers_unusable_reason(device: torch.device) -> str | None:
    """None if xformers can run on ``device``, else a short reason why not."""
    if _xformers_missing():
        return _xformers_import_errors[_xformers_op]
    if device.type != "cuda":
        return f"tensors are on {device.type}, xformers needs CUDA"
    return None


# Largest |kernel - sdpa| the probe accepts, relative to the largest value of the output and of each
# gradient, per dtype: the dtype's rounding at these sizes, far below a wrong kernel's (order 0.1-1).
PROBE_TOLERANCE = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}  # fp32: TF32 matmuls on CUDA
_PROBE_SHAPE = (2, 24, 2)  # batch, tokens, heads: tiny, with a key padding mask on one row

# Probe answers per (kernel, op, device, dtype, head dim): the kernel and its op (the objects, not
# their ids, which a freed function's successor may reuse) are part of the key, so that a test
# substituting either probes afresh.
_probe_results: dict[tuple, str | None] = {}


def _versions_of_xformers(error: BaseException) -> str:
    """`xformers 0.0.35 cannot run here: its kernels did not load (built for torch 2.10.0+cu128, this is 2.11.0+cu130)`."""
    try:
        import xformers  # noqa: PLC0415 - optional dependency

        version = getattr(xformers, "__version__", "(unknown version)")
        load_error = getattr(getattr(xformers, "_cpp_lib", None), "_cpp_library_load_exception", None)
    except ImportError:
        return f"xformers cannot run here: {type(error).__name__}: {_first_line(error)}"
    if load_error is not None:
        built = getattr(getattr(load_error, "build_info", None), "torch_version", None)
        where = f"built for torch {built}, this is {torch.__version__}" if built else f"built for another torch or Python; this is torch {torch.__version__}"
        return f"xformers {version} cannot run here: its kernels did not load ({where})"
    return f"xformers {version} cannot run here: {type(error).__name__}: {_first_line(error)}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _probe(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Run `backend`'s kernel forward and backward on tiny inputs and hold it to sdpa: None, or why not."""
    generator = torch.Generator().manual_seed(0)
    batch, tokens, heads = _PROBE_SHAPE
    inputs = [torch.randn(batch, tokens, heads, head_dim, generator=generator) for _ in range(3)]
    weights = torch.randn(batch, tokens, heads, head_dim, generator=generator).to(device)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[1, tokens // 2 :] = False  # padded keys: the bias path, as cross-attention to captions uses it
    mask = mask.to(device)

    def run(kernel) -> list[torch.Tensor]:
        q, k, v = (t.to(device, dtype).requires_grad_(True) for t in inputs)
        out = kernel(q, k, v, mask)
        grads = torch.autograd.grad((out.float() * weights).sum(), (q, k, v))
        return [t.detach().float() for t in (out, *grads)]

    # Probes may be reached from sampling (no_grad, inference mode) or under autocast.
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        try:
            got = run(_KERNELS[backend])
        except Exception as error:  # noqa: BLE001 - any failure means: not this kernel
            if backend == "xformers":
                return _versions_of_xformers(error)
            return f"{backend} cannot run here: {type(error).__name__}: {_first_line(error)}"
        expected = run(_KERNELS["sdpa"])
    # Relative to each tensor's largest value: gradients grow with the head dim, rounding with them.
    difference = max(((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item() for a, b in zip(got, expected))
    tolerance = PROBE_TOLERANCE.get(dtype, 1e-2)
    if not difference <= tolerance:  # also catches NaN
        name = f"xformers {_xformers_version()}".strip() if backend == "xformers" else backend
        return (f"{name} returns wrong numbers here: its output or gradients differ from sdpa's by up to "
                f"{difference:.3g} of their scale in {str(dtype).removeprefix('torch.')} (tolerance {tolerance:g})")
    return None


def _xformers_version() -> str:
    try:
        import xformers  # noqa: PLC0415 - optional dependency

        return getattr(xformers, "__version__", "")
    except ImportError:
        return ""


def probe(backend: str, device: torch.device | str, dtype: torch.dtype, head_dim: int) -> str | None:
    """None if `backend` runs correctly on `device` in `dtype` for heads of `head_dim`; else one line saying why not.

    Probed once per (kernel, device, dtype, head dim) per process.
    """
    device = torch.device(device)
    if backend == "xformers" and (reason := _xformers_unusable_reason(device)):
        return reason
    key = (backend, _KERNELS[backend], _xformers_op, str(device), dtype, int(head_dim))
    if key not in _probe_results:
        _probe_results[key] = _probe(backend, device, dtype, int(head_dim))
    return _probe_results[key]


def _why_gemm_on_this_cpu() -> str:
    """Why auto takes gemm for bf16 at short sequences here; measured only on CPUs with bf16 instructions."""
    if cpu_computes_bf16():
        return "bf16 on the CPU at short sequences: one matrix product beats the flash kernel"
    # Measured on an AMX Xeon and an AVX512-BF16 EPYC (benchmarks/results/cpu-*/attention.md), never
    # under emulated bf16: the log must not claim a measurement this CPU never had.
    return ("bf16 on the CPU at short sequences: one matrix product, as on CPUs with bf16 instructions where it "
            "beats the flash kernel (this CPU emulates bf16: not measured here)")


def auto_backend(
    device: torch.device, dtype: torch.dtype, query_len: int, key_len: int, head_dim: int = 64
) -> tuple[str, str | None]:
    """The kernel "auto" runs for such queries and keys, and why (None when it is the first choice)."""
    return _choose(torch.device(device), dtype, head_dim, query_len * key_len <= GEMM_MAX_SCORES)


def _choose(device: torch.device, dtype: torch.dtype, head_dim: int, scores_fit_gemm: bool) -> tuple[str, str | None]:
    """`auto_backend` given only whether the scores per head are few enough for gemm (all the lengths decide)."""
    reason = probe("xformers", device, dtype, head_dim)
    if not reason:
        return "xformers", None
    if device.type == "cpu" and dtype == torch.bfloat16 and scores_fit_gemm:
        gemm_failure = probe("gemm", device, dtype, head_dim)
        if not gemm_failure:
            return "gemm", f"{reason}; {_why_gemm_on_this_cpu()}"
        reason = f"{reason}; {gemm_failure}"
    return "sdpa", reason


def require_backend(backend: str, device: torch.device | str, dtype: torch.dtype, head_dim: int, key: str = "attention_backend") -> None:
    """Raise `AttentionUnavailable` naming `key` unless `backend` passes the probe here (auto and sdpa always do)."""
    check_backend(backend)
    if backend in ("auto", "sdpa"):
        return
    reason = probe(backend, device, dtype, head_dim)
    if reason:
        install = " or install xformers and torch from one index (pip install 'unizoo[xformers]', README: On a GPU)" if backend == "xformers" else ""
        raise AttentionUnavailable(
            f"{key}={backend} cannot run on {torch.device(device)} in {str(dtype).removeprefix('torch.')}: {reason}. "
            f"Use {key}=auto (it falls back to sdpa where {backend} cannot run) or sdpa{install}."
        )


# Run by torch.compile at trace time, its answer a constant of the graph: a logging call
# (or the import inside the xformers check) traced in the graph would break it at
# every attention call.
@torch.compiler.assume_constant_result
def _auto_choice(device: torch.device, dtype: torch.dtype, head_dim: int, scores_fit_gemm: bool) -> str:
    """`auto_backend`'s kernel, logged the first time each choice is made."""
    chosen, reason = _choose(device, dtype, head_dim, scores_fit_gemm)
    message = f"attention backend: auto -> {chosen}" + (f" ({reason}; using {chosen})" if reason else "")
    if message not in _logged_choices:
        _logged_choices.add(message)
        logger.info(message)
    return chosen


def _resolve(backend: str, q: torch.Tensor, k: torch.Tensor) -> str:
    """Map ``backend`` (possibly "auto") to the concrete kernel to run for these queries and keys."""
    check_backend(backend)
    if backend == "auto":
        # The lengths matter only to the CPU's bf16 rule, and only as one bool. Under torch.compile with a dynamic
        # length (captions of several lengths), a symbolic size passed to the constant-folded choice cannot be
        # folded: dynamo broke the graph at every attention call. A branch on the sizes becomes a guard instead.
        scores_fit_gemm = False
        if q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[1] * k.shape[1] <= GEMM_MAX_SCORES:
            scores_fit_gemm = True
        return _auto_choice(q.device, q.dtype, int(q.shape[-1]), scores_fit_gemm)
    if backend == "xformers":
        reason = _xformers_unusable_reason(q.device)  # its kernel is probed when a model asks for it (require_backend)
        if reason:
            # An explicit request is a promise the benchmark relies on: never fall back silently.
            raise RuntimeError(
                f"attention backend 'xformers' requested but unusable: {reason}. "
                "Use backend='sdpa' (or 'auto'), or install xformers "
                "(pip install unizoo[xformers]) and run on a CUDA device."
            )
    return backend


def _math_kernel(q, k, v, key_padding_mask):
    """Reference kernel. fp32 scores/softmax so fp16/bf16 inputs do not overflow."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    weights = scores.softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", weights, v.float()).to(q.dtype)


def _gemm_kernel(q, k, v, key_padding_mask):
    """``math`` in the input dtype: scale q (N·K products, not N² scores), then two batched products."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, M, K] views
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-1, -2)
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    return (scores.softmax(dim=-1) @ v).transpose(1, 2)


def _sdpa_kernel(q, k, v, key_padding_mask):
    # SDPA wants [B, H, M, K]; the transposes are views, no copy.
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


def _xformers_bias(key_padding_mask: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Additive bias ``[B, H, Mq, Mk]`` with -inf at masked keys, in q's dtype.

    xformers' kernels read the bias with aligned loads, so its last dimension must be
    *allocated* padded to a multiple of 8; we allocate ``Mk_pad`` and slice back to
    ``Mk`` (a view whose row stride stays a multiple of 8).
    """
    B, Mq, H, _ = q.shape
    Mk = key_padding_mask.shape[1]
    Mk_pad = (Mk + 7) // 8 * 8
    bias = torch.zeros(B, H, Mq, Mk_pad, dtype=q.dtype, device=q.device)[..., :Mk]
    bias.masked_fill_(~key_padding_mask[:, None, None, :], float("-inf"))
    return bias


def _xformers_kernel(q, k, v, key_padding_mask):
    bias = None if key_padding_mask is None else _xformers_bias(key_padding_mask, q)
    return _xformers_op()(q, k, v, attn_bias=bias)


_KERNELS = {"math": _math_kernel, "sdpa": _sdpa_kernel, "gemm": _gemm_kernel, "xformers": _xformers_kernel}


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention, softmax(q kᵀ / sqrt(K)) v, per head.

    Args:
        q: ``(B, Mq, H, K)`` queries.
        k: ``(B, Mk, H, K)`` keys.
        v: ``(B, Mk, H, Kv)`` values.
        key_padding_mask: bool ``(B, Mk)``, True = attend; None = all keys valid.
        backend: one of ``BACKENDS``.

    Returns:
        ``(B, Mq, H, Kv)`` in q's dtype. Rows whose keys are all masked are 0.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention expects [B, M, H, K] tensors, got q{tuple(q.shape)} "
            f"k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    kernel = _KERNELS[_resolve(backend, q, k)]
    if key_padding_mask is None:
        return kernel(q, k, v, None)

    key_padding_mask = key_padding_mask.to(device=q.device, dtype=torch.bool)
    if key_padding_mask.shape != (k.shape[0], k.shape[1]):
        raise ValueError(
            f"key_padding_mask must be [B, Mk] = {(k.shape[0], k.shape[1])}, "
            f"got {tuple(key_padding_mask.shape)}"
        )
    # Fully masked rows: let them attend to everything (finite, no NaN forward or
    # backward), then zero their output. Done with where/multiply rather than an
    # `if any()` so it never forces a host-device sync.
    has_key = key_padding_mask.any(dim=1)  # (B,)
    safe_mask = key_padding_mask | ~has_key[:, None]
    out = kernel(q, k, v, safe_mask)
    return out * has_key[:, None, None, None].to(out.dtype)
