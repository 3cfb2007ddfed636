"""`unizoo env`: what is installed and what unizoo will choose on this machine, ready to paste into a bug report.

As `diffusers-cli env` and `python -m xformers.info` do for their projects: the versions that
matter (torch with its CUDA build, Lightning, diffusers, transformers, xformers and whether
xformers' kernels load), every device with its bf16 support, and what the default recipe
resolves to here: the trainer's device and precision, and the attention kernel `auto` takes
for the default DiT, with the reason (the same probe a run makes), and whether the generator
and the backbone's language model train compiled (`compile`).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from pathlib import Path

import torch

import unizoo

PACKAGES = ("lightning", "diffusers", "transformers", "torchvision", "xformers")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def xformers_status() -> str:
    """`not installed`, or its version and whether its compiled kernels loaded (and what they were built for)."""
    version = _version("xformers")
    if version is None:
        return "not installed"
    try:
        import xformers  # noqa: PLC0415 - optional dependency
    except Exception as error:  # noqa: BLE001 - a broken install is what this line reports
        return f"{version}, does not import: {type(error).__name__}: {error}"
    load_error = getattr(getattr(xformers, "_cpp_lib", None), "_cpp_library_load_exception", None)
    if load_error is None:
        return f"{version}, kernels loaded"
    built = getattr(getattr(load_error, "build_info", None), "torch_version", None)
    where = f"built for torch {built}, this is {torch.__version__}" if built else f"built for another torch or Python; this is {torch.__version__}"
    return f"{version}, its kernels did not load ({where}): attention auto falls back to sdpa"


def _torch_line() -> str:
    cuda = torch.version.cuda
    build = f"CUDA build {cuda}" if cuda else "CPU build"
    available = f"{torch.cuda.device_count()} CUDA device(s) visible" if torch.cuda.is_available() else "no CUDA device visible"
    return f"{torch.__version__} ({build}; {available})"


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def device_lines() -> list[str]:
    """One line per device: the CPU and each CUDA GPU, with bf16 support."""
    from unizoo.runtime.precision import cpu_computes_bf16  # noqa: PLC0415

    lines = [f"cpu: {cpu_name()}, {os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads; "
             f"bf16 native: {'yes' if cpu_computes_bf16() else 'no (emulated, slower than fp32)'}"]
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        with torch.cuda.device(index):
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        lines.append(f"cuda:{index}: {properties.name}, {properties.total_memory / 2**30:.1f} GiB, compute capability "
                     f"{properties.major}.{properties.minor}; bf16 native: {'yes' if bf16 else 'no'}")
    return lines


def default_choices() -> list[str]:
    """What the default recipe resolves to here: the trainer's device and precision, the DiT's attention kernel, compile."""
    from hydra.utils import instantiate  # noqa: PLC0415

    from unizoo.components.generators.attention import auto_backend  # noqa: PLC0415
    from unizoo.components.generators.dit import DIT_SIZES  # noqa: PLC0415
    from unizoo.config.composition import compose_recipe  # noqa: PLC0415
    from unizoo.runtime.accelerator import describe_accelerator  # noqa: PLC0415
    from unizoo.runtime.compilation import resolve_compile  # noqa: PLC0415
    from unizoo.runtime.fabric import loop_device  # noqa: PLC0415
    from unizoo.runtime.precision import compute_dtype  # noqa: PLC0415

    recipe = compose_recipe("default")
    trainer = recipe.trainer
    lines = [f"default trainer: {describe_accelerator(trainer.accelerator)}, precision {trainer.precision}"]
    size = DIT_SIZES[recipe.generator.size]
    head_dim = size["hidden_size"] // size["num_heads"]
    tokens, _ = instantiate(recipe.representation, _convert_="all").token_shape
    device, dtype = loop_device(trainer.accelerator), compute_dtype(trainer.precision)
    chosen, reason = auto_backend(device, dtype, tokens, tokens, head_dim)
    where = f"{tokens} tokens, head dim {head_dim}, {str(dtype).removeprefix('torch.')} on {device}"
    lines.append(f"attention for the default DiT ({where}): auto -> {chosen}" + (f" ({reason})" if reason else " (its first choice)"))
    compiled, why = resolve_compile(recipe.compile, device)
    lines.append(f"the generator and the backbone's language model while a stage trains them: compile "
                 f"{str(recipe.compile).lower()} -> "
                 f"{'compiled' if compiled else 'eager'} ({why})")
    return lines


def describe_environment() -> str:
    lines = [f"unizoo {unizoo.__version__}", f"- python: {platform.python_version()} ({sys.executable})",
             f"- platform: {platform.platform()}", f"- torch: {_torch_line()}"]
    for package in PACKAGES:
        lines.append(f"- {package}: {xformers_status() if package == 'xformers' else (_version(package) or 'not installed')}")
    lines.append("- devices:")
    lines += [f"  - {line}" for line in device_lines()]
    lines += [f"- {line}" for line in default_choices()]
    return "\n".join(lines)
