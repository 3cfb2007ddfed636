"""bf16 where the hardware computes it natively, fp32 elsewhere: the `${bf16_if_native:ACCELERATOR}` resolver.

On a CPU with AVX512-BF16 or AMX (Intel Cooper Lake, Sapphire Rapids and later; AMD Zen 4
and later) bf16 autocast is a real speed-up: the default recipe's generation stage runs
about 1.25x faster, at the same scores (two seeds each,
benchmarks/results/cpu-intel-r-xeon-r-processor-2c/bf16_vs_fp32.md). Elsewhere oneDNN
emulates bf16 and autocast is slower than fp32, so the choice depends on the machine. The
resolved value is what the run's recipe.yaml records. The tiny VAE's pretraining does not
follow it (recipes/vae/tiny.yaml says why).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from unizoo.runtime.fabric import loop_device

BF16 = "bf16-mixed"
FP32 = "32-true"


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX tiles), not an emulation."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private torch.cpu helpers: absent = no
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def computes_bf16_natively(accelerator: str) -> bool:
    """Whether `accelerator` (a Lightning accelerator name: cpu, gpu, cuda, auto) runs bf16 at full speed."""
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return cpu_computes_bf16() if accelerator in ("cpu", "auto") else False


def bf16_if_native(accelerator: str = "cpu") -> str:
    """`bf16-mixed` where `accelerator` computes bf16 natively, else `32-true`."""
    return BF16 if computes_bf16_natively(accelerator) else FP32


def describe_precision(trainer: DictConfig) -> str:
    """The trainer recipe's precision and why it is that one: a line for the run's log."""
    chosen = trainer.precision
    if not OmegaConf.is_interpolation(trainer, "precision"):
        return f"precision {chosen}, as the recipe sets it"
    device = loop_device(str(trainer.accelerator)).type  # what `auto` became here
    device = "GPU" if device == "cuda" else device
    if chosen == BF16:
        return (f"precision {chosen}, because this {device} computes bf16 natively "
                f"(trainer.precision={FP32} trains in fp32)")
    return f"precision {chosen}, because this {device} has no native bf16 (autocast would emulate it, slower)"


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype a Lightning precision setting computes matrix products in: bf16 / fp16 under mixed or true half precision."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32
