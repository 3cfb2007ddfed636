"""unizoo's DiT against diffusers' DiT: full training steps, side by side.

Every variant runs the same ``steps`` training steps (forward, MSE, backward, AdamW
step) from the same initial weights of its model family on the same batches (the
DiT init with its zero-initialised matrices re-drawn, see ``wake_zero_init``):

* the first ``warmup`` steps are untimed (torch.compile compiles in the first one;
  ``first_step_s`` reports it); the median of the rest is the step time;
* every step's loss is kept, so each faster switch's loss curve is compared with its
  family's fp32 eager curve step by step (``TOLERANCE``, relative);
* peak memory covers building the model and all steps: weights, gradients, AdamW
  state, activations (and, for compile rows on CPU, the compiler's own memory).

FLOPs per step are counted once per model family (fp32, eager, sdpa attention; on
the meta device, so counting costs no compute) and
are *model* FLOPs: the recomputation of activation checkpointing is not counted, so
MFU compares useful work. Switches that cannot run here become ``skipped: <reason>``.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import asdict, dataclass

import torch

from unizoo.components.generators.attention import auto_backend

from .attention_backends import unavailable_reason
from .measure import PeakMemory, Timing, count_flops, mfu, time_call
from .peer_models import (
    PeerConfig,
    build_diffusers,
    build_unizoo,
    diffusers_loss,
    make_batches,
    parameter_count,
    unizoo_loss,
    wake_zero_init,
)


@dataclass(frozen=True)
class Variant:
    name: str
    model: str  # "unizoo" | "diffusers"
    precision: str = "fp32"  # "bf16" = torch.autocast(device_type, dtype=torch.bfloat16)
    compile: bool = False
    fused_adamw: bool = False
    checkpointing: bool = False
    attention: str | None = None  # unizoo only; None = PeerConfig.attention

    @property
    def is_switch(self) -> bool:
        return self.compile or self.fused_adamw or self.checkpointing or self.attention is not None


VARIANTS = (
    Variant("diffusers fp32", "diffusers"),
    Variant("diffusers bf16", "diffusers", "bf16"),
    Variant("unizoo fp32", "unizoo"),
    Variant("unizoo bf16", "unizoo", "bf16"),
    Variant("unizoo bf16 sdpa", "unizoo", "bf16", attention="sdpa"),
    Variant("unizoo compile", "unizoo", compile=True),
    Variant("unizoo fused-adamw", "unizoo", fused_adamw=True),
    Variant("unizoo checkpointing", "unizoo", checkpointing=True),
    Variant("unizoo xformers", "unizoo", attention="xformers"),
    Variant("unizoo bf16+compile+fused", "unizoo", "bf16", compile=True, fused_adamw=True),
)
REFERENCE = {"unizoo": "unizoo fp32", "diffusers": "diffusers fp32"}
# Per-step |loss - reference loss| / |reference loss| allowed. fp32 switches only
# reorder floating-point work (compile fuses, fused AdamW vectorises, checkpointing
# recomputes); bf16 rounds activations to 8 mantissa bits.
TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2}

_LOSSES = {"unizoo": unizoo_loss, "diffusers": diffusers_loss}


def _build(variant: Variant, cfg: PeerConfig) -> torch.nn.Module:
    if variant.model == "diffusers":
        return build_diffusers(cfg)
    return build_unizoo(cfg, gradient_checkpointing=variant.checkpointing, attention=variant.attention)


def _short(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def _skip_reason(variant: Variant, device: torch.device) -> str | None:
    if variant.attention:
        return unavailable_reason(variant.attention, device)
    return None


def _switch_names(variant: Variant, cfg: PeerConfig, device: torch.device) -> str:
    names = ["bf16 autocast" if variant.precision == "bf16" else "fp32"]
    if variant.compile:
        names.append(f"torch.compile({cfg.compile_backend})")
    if variant.fused_adamw:
        names.append("fused AdamW")
    if variant.checkpointing:
        names.append("activation checkpointing")
    if variant.model == "unizoo":
        backend = variant.attention or cfg.attention
        if backend == "auto":  # name the kernel it ran
            dtype = torch.bfloat16 if variant.precision == "bf16" else torch.float32
            backend = f"auto -> {auto_backend(device, dtype, cfg.num_tokens, cfg.num_tokens)[0]}"
        names.append(f"attention={backend}")
    return ", ".join(names)


def train_run(variant: Variant, cfg: PeerConfig, init_state: dict, batches, device) -> tuple[Timing, list]:
    """Run one step per batch; return per-step times and per-step losses."""
    # diffusers' DiT drops 10% of class labels at random in training (its built-in
    # classifier-free-guidance dropout): the same seed gives every variant the same drops.
    torch.manual_seed(cfg.seed + 2)
    model = _build(variant, cfg)
    model.load_state_dict(init_state)
    model.to(device).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=0.0, fused=True if variant.fused_adamw else None
    )
    runnable = torch.compile(model, backend=cfg.compile_backend) if variant.compile else model
    loss_fn = _LOSSES[variant.model]
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if variant.precision == "bf16" else contextlib.nullcontext()
    )
    losses = []
    remaining = iter(batches)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(runnable, next(remaining))
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())

    timing = time_call(step, device, warmup=0, repeats=len(batches))
    return timing, [float(loss) for loss in losses]


def count_step_flops(model_name: str, cfg: PeerConfig, batch) -> int:
    """Model FLOPs of forward + backward of one batch (fp32, eager, sdpa attention).

    Counted on the meta device (shapes only, no compute, identical counts); on the
    CPU if some op has no meta kernel.
    """
    variant = Variant("count", model_name, attention="sdpa" if model_name == "unizoo" else None)
    for device in (torch.device("meta"), torch.device("cpu")):
        try:
            with device:
                model = _build(variant, cfg)
            on_device = batch.to(device)
            return count_flops(lambda: _LOSSES[model_name](model.train(), on_device).backward())
        except (RuntimeError, NotImplementedError):
            if device.type != "meta":
                raise
    raise AssertionError("unreachable")


def measure_variant(variant, cfg, device, init_state, batches, flops, params, peaks) -> dict:
    row = {"name": variant.name, "model": variant.model, "params": params,
           "precision": variant.precision,
           "switches": _switch_names(variant, cfg, device), "status": "ok"}
    reason = _skip_reason(variant, device)
    if reason:
        return {**row, "status": f"skipped: {reason}"}
    try:
        with PeakMemory(device) as memory:
            timing, losses = train_run(variant, cfg, init_state, batches, device)
    except Exception as error:  # noqa: BLE001 - one variant failing must not stop the others
        kind = "skipped" if variant.is_switch or variant.precision != "fp32" else "failed"
        return {**row, "status": f"{kind}: {_short(error)}"}
    finally:
        if variant.compile:
            torch._dynamo.reset()
        gc.collect()
    timed = Timing(timing.times_s[cfg.warmup:])
    seconds = timed.median_s
    return {
        **row,
        "first_step_s": timing.times_s[0],
        "step_ms": seconds * 1e3,
        "times_ms": [t * 1e3 for t in timed.times_s],
        "images_per_s": cfg.batch / seconds,
        "flops_per_step": flops,
        "tflops_per_s": flops / seconds / 1e12,
        "mfu": mfu(flops, seconds, peaks.get(variant.precision, {}).get("flops_per_s")),
        "peak_mem_mb": memory.bytes / 2**20,
        "losses": losses,
    }


def loss_checks(rows: list[dict]) -> list[dict]:
    """Each measured non-reference variant's loss curve against its family's fp32 curve."""
    by_name = {row["name"]: row for row in rows}
    checks = []
    for row in rows:
        reference = by_name.get(REFERENCE[row["model"]])
        if row["name"] in REFERENCE.values() or row["status"] != "ok" or not reference or reference["status"] != "ok":
            continue
        tolerance = TOLERANCE[row["precision"]]
        diffs = [abs(a - b) / abs(b) for a, b in zip(row["losses"], reference["losses"])]
        checks.append({
            "variant": row["name"], "reference": reference["name"], "steps": len(diffs),
            "tolerance_rel": tolerance, "max_rel_diff": max(diffs),
            "reference_first_loss": reference["losses"][0], "reference_last_loss": reference["losses"][-1],
            "passed": max(diffs) <= tolerance,
        })
    return checks


def _add_ratios(rows: list[dict]) -> None:
    by_name = {row["name"]: row for row in rows}
    for row in rows:
        for key, base in (("vs_diffusers_fp32", "diffusers fp32"), ("vs_diffusers_bf16", "diffusers bf16")):
            ok = row["status"] == "ok" and by_name.get(base, {}).get("status") == "ok"
            row[key] = row["images_per_s"] / by_name[base]["images_per_s"] if ok else None


def run_peer(cfg: PeerConfig, device: torch.device, peaks: dict, variants=VARIANTS, progress=print) -> dict:
    """All variants, loss checks, parameter counts and FLOPs, plus the configuration used."""
    steps = max(cfg.loss_steps, cfg.warmup + cfg.repeats)
    batches = make_batches(cfg, steps, device)
    models, init_states, flops, params, woken = {"unizoo", "diffusers"}, {}, {}, {}, {}
    for name in sorted(models):
        torch.manual_seed(cfg.seed)
        model = _build(Variant("init", name), cfg)
        params[name] = parameter_count(model)
        woken[name] = len(wake_zero_init(model))
        init_states[name] = {key: value.clone() for key, value in model.state_dict().items()}
        del model
        flops[name] = count_step_flops(name, cfg, batches[0])
        progress(f"peer {name}: {params[name] / 1e6:.2f}M parameters, {flops[name] / 1e9:.4g} GFLOP "
                 f"per training step (forward + backward), {woken[name]} zero-init weights re-drawn")
    rows = []
    for variant in variants:
        family = variant.model
        row = measure_variant(variant, cfg, device, init_states[family], batches, flops[family], params[family], peaks)
        rows.append(row)
        if row["status"] == "ok":
            progress(f"peer {variant.name:<28} {row['step_ms']:9.1f} ms/step  {row['images_per_s']:8.2f} img/s  "
                     f"{row['peak_mem_mb']:8.1f} MiB  (first step {row['first_step_s']:.1f} s)")
        else:
            progress(f"peer {variant.name:<28} {row['status']}")
    _add_ratios(rows)
    return {
        "config": {**asdict(cfg), "steps": steps, "timed_steps": steps - cfg.warmup, "label": cfg.label},
        "parameters": params,
        "zero_init_weights_redrawn": woken,
        "flops_per_step": flops,
        "tolerance_rel": TOLERANCE,
        "rows": rows,
        "loss_checks": loss_checks(rows),
    }
