"""unizoo's DiT against a peer (diffusers' DiT or PixArt): full training steps, side by side.

Both families get the same switches (fp32, bf16 autocast, torch.compile, fused AdamW,
all together), so each side's best row is found in the same run; ``best_vs_best``
compares them, and a unizoo row slower than the peer's row with the same switches
gets a "why": the op that costs it, from one profiled step of each (``peer_why``).

Every variant runs the same ``steps`` training steps (forward, MSE, backward, AdamW
step) from the same initial weights of its model family on the same batches (the
DiT init with its zero-initialised matrices re-drawn, see ``wake_zero_init``):

* the first ``warmup`` steps are untimed (torch.compile compiles in the first one;
  ``first_step_s`` reports it); the median of the rest is the step time;
* a peer row and the unizoo row with the same switches are timed together, their steps
  alternating (``measure_together``), so a machine whose speed drifts slows both alike;
* every step's loss is kept, so each faster switch's loss curve is compared with its
  family's fp32 eager curve step by step (``TOLERANCE``, relative);
* peak memory covers building the model and its warmup steps, run alone: weights,
  gradients, AdamW state, activations (and, for compile rows on CPU, the compiler's own
  memory); later steps allocate the same again.

FLOPs per step are counted once per model family (fp32, eager, sdpa attention; on
the meta device, so counting costs no compute) and
are *model* FLOPs: the recomputation of activation checkpointing is not counted, so
MFU compares useful work. Switches that cannot run here become ``skipped: <reason>``;
rows that cannot fit the machine's memory or time say so (``row_guard``).
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import asdict, dataclass, replace

import torch

from unizoo.components.generators.attention import auto_backend

from .attention_backends import unavailable_reason
from .measure import PeakMemory, Timing, bf16_is_emulated, count_flops, mfu, synchronize
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
from .peer_pixart import build_pixart, pixart_loss
from .peer_why import kernel_profiling, self_time_by_op, top_difference, why_text
from .row_guard import RowLimits, RowTooSlow, StepClock, precheck


@dataclass(frozen=True)
class Variant:
    name: str
    model: str  # "unizoo" or a peer: "diffusers" | "pixart"
    precision: str = "fp32"  # "bf16" = torch.autocast(device_type, dtype=torch.bfloat16)
    compile: bool = False
    fused_adamw: bool = False
    checkpointing: bool = False
    attention: str | None = None  # unizoo only; None = PeerConfig.attention

    @property
    def is_switch(self) -> bool:
        return self.compile or self.fused_adamw or self.checkpointing or self.attention is not None

    @property
    def is_switch_lever(self) -> bool:
        """A unizoo-only lever (checkpointing, another attention kernel): no peer row to pair with."""
        return self.checkpointing or self.attention is not None

    @property
    def switch_key(self) -> tuple:
        """The switches both families have: rows with the same key are compared directly."""
        return (self.precision, self.compile, self.fused_adamw)


def switch_variants(model: str) -> tuple[Variant, ...]:
    """The switches every family gets: each alone, then all together."""
    return (
        Variant(f"{model} fp32", model),
        Variant(f"{model} bf16", model, "bf16"),
        Variant(f"{model} compile", model, compile=True),
        Variant(f"{model} fused-adamw", model, fused_adamw=True),
        Variant(f"{model} bf16+compile+fused", model, "bf16", compile=True, fused_adamw=True),
    )


def variants_for(peer: str) -> tuple[Variant, ...]:
    """The peer's switches, then unizoo's (the same ones plus its own levers)."""
    unizoo = switch_variants("unizoo")
    return (
        *switch_variants(peer),
        *unizoo[:2],
        Variant("unizoo bf16 sdpa", "unizoo", "bf16", attention="sdpa"),
        *unizoo[2:4],
        Variant("unizoo checkpointing", "unizoo", checkpointing=True),
        Variant("unizoo xformers", "unizoo", attention="xformers"),
        unizoo[4],
    )


VARIANTS = variants_for("diffusers")
FAMILIES = {
    "unizoo": (build_unizoo, unizoo_loss),
    "diffusers": (build_diffusers, diffusers_loss),
    "pixart": (build_pixart, pixart_loss),
}
REFERENCE = {family: f"{family} fp32" for family in FAMILIES}
# The modulation unizoo's DiT is built with against each peer unless PeerConfig.adaln says
# otherwise: the peer's own, so both sides have the same architecture where unizoo can match
# it (diffusers' DiT: adaLN-Zero, a Linear per block; PixArt: adaLN-single, one shared Linear).
PEER_ADALN = {"diffusers": "zero", "pixart": "single"}
# Per-step |loss - reference loss| / |reference loss| allowed. fp32 switches only
# reorder floating-point work (compile fuses, fused AdamW vectorises, checkpointing
# recomputes); bf16 rounds activations to 8 mantissa bits.
TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2}


def _build(variant: Variant, cfg: PeerConfig) -> torch.nn.Module:
    if variant.model == "unizoo":
        return build_unizoo(cfg, gradient_checkpointing=variant.checkpointing, attention=variant.attention)
    return FAMILIES[variant.model][0](cfg)


def _short(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def _skip_reason(variant: Variant, cfg: PeerConfig, device: torch.device) -> str | None:
    if variant.precision == "bf16" and not cfg.emulated_bf16 and bf16_is_emulated(device):
        # Emulated bf16 runs matmuls about 100x slower than fp32: at DiT-S/2 each such row would
        # run into the row limit and say nothing about a switch anyone would turn on here.
        return "bf16 is emulated on this CPU (no AVX512-BF16 or AMX), about 100x slower than fp32; --emulated-bf16 runs it"
    if variant.attention:
        dtype = torch.bfloat16 if variant.precision == "bf16" else torch.float32
        return unavailable_reason(variant.attention, device, dtype)
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


def trainer(variant: Variant, cfg: PeerConfig, init_state: dict, device: torch.device):
    """``step(batch) -> loss``: one training step of ``variant`` (forward, MSE, backward, AdamW)."""
    # diffusers' DiT drops 10% of class labels at random in training (its built-in
    # classifier-free-guidance dropout): the same seed gives every variant the same drops.
    torch.manual_seed(cfg.seed + 2)
    # Built on the device: its initial weights are replaced by `init_state` at once, and initialising the 750M
    # and 830M parameters of DiT-XL/2 on the host took seconds a row (on a CPU the same as before).
    with device:
        model = _build(variant, cfg)
    model.load_state_dict(init_state)
    model.to(device).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=0.0, fused=True if variant.fused_adamw else None
    )
    # Inductor draws random numbers with its own generator, so diffusers' label drops (torch.rand inside its
    # forward) differed from the eager reference's and its compiled fp32 row failed the loss check (2.8e-2 on
    # the Xeon's DiT-S/2, 3e-3 at the quick size, against a 1e-3 tolerance); with torch's generator, 2e-7.
    # An option of this compiled model, not a setting of the process: nothing else compiled here is changed.
    options = {"fallback_random": True} if cfg.compile_backend == "inductor" else None
    runnable = torch.compile(model, backend=cfg.compile_backend, options=options) if variant.compile else model
    loss_fn = FAMILIES[variant.model][1]
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if variant.precision == "bf16" else contextlib.nullcontext()
    )

    def step(batch):
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(runnable, batch)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


class _Side:
    """One variant inside :func:`measure_together`: its training step, per-step times and losses."""

    def __init__(self, variant: Variant, cfg: PeerConfig, init_state: dict, device: torch.device,
                 steps: int, limits: RowLimits):
        self.device = device
        self.train_step = trainer(variant, cfg, init_state, device)
        self.clock = StepClock(limits, steps)
        self.times_s: list[float] = []
        self.losses: list[float] = []
        self.memory_bytes = 0

    def step(self, batch) -> None:
        synchronize(self.device)
        start = time.perf_counter()
        loss = self.train_step(batch)
        synchronize(self.device)
        self.times_s.append(time.perf_counter() - start)
        self.losses.append(float(loss))
        self.clock.check(self.times_s[-1])


def _row_base(variant: Variant, cfg: PeerConfig, device: torch.device, params: int) -> dict:
    return {"name": variant.name, "model": variant.model, "params": params, "precision": variant.precision,
            "switches": _switch_names(variant, cfg, device), "status": "ok"}


def _failure_status(variant: Variant, error: BaseException) -> str:
    if isinstance(error, RowTooSlow):
        return error.status
    kind = "skipped" if variant.is_switch or variant.precision != "fp32" else "failed"
    return f"{kind}: {_short(error)}"


def _measured_row(row: dict, side: _Side, cfg: PeerConfig, flops: int, peak: float | None) -> dict:
    seconds = Timing(side.times_s[cfg.warmup:]).median_s
    return {
        **row,
        "first_step_s": side.times_s[0],
        "step_ms": seconds * 1e3,
        "times_ms": [t * 1e3 for t in side.times_s[cfg.warmup:]],
        "images_per_s": cfg.batch / seconds,
        "flops_per_step": flops,
        "tflops_per_s": flops / seconds / 1e12,
        "mfu": mfu(flops, seconds, peak),
        "peak_mem_mb": side.memory_bytes / 2**20,
        "losses": side.losses,
    }


def measure_together(variants, cfg, device, init_states: dict, batches, flops: dict, params: dict, peaks,
                     limits: RowLimits = RowLimits()) -> list[dict]:
    """One row per variant, their timed steps alternating (one variant: measured alone).

    Each variant is built and runs its ``warmup`` steps (at least one) alone, under its own
    :class:`PeakMemory`; then the timed steps alternate between the variants, in turns whose
    order flips every step (A B, B A, ...). A CPU whose speed drifts over minutes (a shared
    VM: one row's steps ranged 1.45-1.59 s) then slows both sides of a comparison alike,
    where timing one side's steps after the other's would charge the drift to one of them.
    A variant that fails or runs past its time limit drops out; the others go on.
    """
    rows, sides = [], []
    first_steps = min(max(cfg.warmup, 1), len(batches))
    try:
        for variant in variants:
            family = variant.model
            row = _row_base(variant, cfg, device, params[family])
            status = _skip_reason(variant, cfg, device)
            status = f"skipped: {status}" if status else precheck(
                cfg, params[family], flops[family], len(batches), peaks.get(variant.precision, {}).get("flops_per_s"),
                limits, precision=variant.precision, device=device)
            side = None
            if not status:
                try:
                    with PeakMemory(device) as memory:
                        side = _Side(variant, cfg, init_states[family], device, len(batches), limits)
                        for batch in batches[:first_steps]:
                            side.step(batch)
                    side.memory_bytes = memory.bytes
                except Exception as error:  # noqa: BLE001 - one variant failing must not stop the others
                    status, side = _failure_status(variant, error), None
            rows.append({**row, "status": status} if status else row)
            sides.append(side)
        for index in range(first_steps, len(batches)):
            turn = [i for i, side in enumerate(sides) if side is not None]
            for i in turn if index % 2 == 0 else reversed(turn):
                try:
                    sides[i].step(batches[index])
                except Exception as error:  # noqa: BLE001
                    rows[i]["status"], sides[i] = _failure_status(variants[i], error), None
        return [row if side is None else _measured_row(row, side, cfg, flops[row["model"]],
                                                       peaks.get(row["precision"], {}).get("flops_per_s"))
                for row, side in zip(rows, sides)]
    finally:
        if any(variant.compile for variant in variants):
            torch._dynamo.reset()
        del sides
        gc.collect()


def pair_up(variants, peer: str) -> list[tuple[Variant, ...]]:
    """Groups measured together: each peer variant with the unizoo variant of the same switches.

    unizoo's own levers (another attention kernel, checkpointing) have no peer counterpart
    and are measured alone. Groups come in the order of their first variant.
    """
    unizoo_by_key = {}
    for variant in variants:
        if variant.model == "unizoo" and not variant.is_switch_lever:
            unizoo_by_key.setdefault(variant.switch_key, variant)
    partner = {v.name: unizoo_by_key[v.switch_key] for v in variants
               if v.model == peer and v.switch_key in unizoo_by_key}
    taken = {unizoo.name for unizoo in partner.values()}  # measured with their peer
    return [(v, partner[v.name]) if v.name in partner else (v,) for v in variants if v.name not in taken]


def count_step_flops(model_name: str, cfg: PeerConfig, batch) -> int:
    """Model FLOPs of forward + backward of one batch (fp32, eager, sdpa attention).

    Counted on the meta device (shapes only, no compute, identical counts); on the
    CPU if some op has no meta kernel.
    """
    variant = Variant("count", model_name, attention="sdpa" if model_name == "unizoo" else None)
    loss_fn = FAMILIES[model_name][1]
    for device in (torch.device("meta"), torch.device("cpu")):
        try:
            with device:
                model = _build(variant, cfg)
            on_device = batch.to(device)
            return count_flops(lambda: loss_fn(model.train(), on_device).backward())
        except (RuntimeError, NotImplementedError):
            if device.type != "meta":
                raise
    raise AssertionError("unreachable")


def measure_variant(variant, cfg, device, init_state, batches, flops, params, peaks,
                    limits: RowLimits = RowLimits()) -> dict:
    """One variant's row, measured alone."""
    family = variant.model
    return measure_together([variant], cfg, device, {family: init_state}, batches, {family: flops},
                            {family: params}, peaks, limits)[0]


def references(rows: list[dict]) -> dict[str, dict]:
    """Each family's reference row, the one its other rows' loss curves are checked against.

    Its fp32 eager row; where that did not run (a size whose fp32 step does not fit the device, such as
    DiT-XL/2 at batch 256 on one GPU, where the bf16 rows do), its bf16 eager row, against which the
    family's other bf16 rows are checked: what compiling and fused AdamW change. The bf16 row itself is
    then checked against fp32 at the sizes where both run, not at this one.
    """
    by_name = {row["name"]: row for row in rows}
    found = {}
    for family in dict.fromkeys(row["model"] for row in rows):
        for name in (REFERENCE[family], f"{family} bf16"):
            if by_name.get(name, {}).get("status") == "ok":
                found[family] = by_name[name]
                break
    return found


def loss_checks(rows: list[dict]) -> list[dict]:
    """Each measured non-reference variant's loss curve against its family's reference curve (`references`)."""
    found = references(rows)
    checks = []
    for row in rows:
        reference = found.get(row["model"])
        if reference is None or row is reference or row["status"] != "ok":
            continue
        if reference["precision"] != "fp32" and row["precision"] != reference["precision"]:
            continue  # an fp32 row is not held to a bf16 curve
        tolerance = TOLERANCE[row["precision"]]
        diffs = [abs(a - b) / abs(b) for a, b in zip(row["losses"], reference["losses"])]
        checks.append({
            "variant": row["name"], "reference": reference["name"], "steps": len(diffs),
            "tolerance_rel": tolerance, "max_rel_diff": max(diffs),
            "reference_first_loss": reference["losses"][0], "reference_last_loss": reference["losses"][-1],
            "passed": max(diffs) <= tolerance,
        })
    return checks


def _add_ratios(rows: list[dict], variants, peer: str) -> None:
    """images/s over the peer's fp32 row, its bf16 row, and its row with the same switches."""
    by_name = {row["name"]: row for row in rows}
    peer_by_key = {v.switch_key: by_name[v.name] for v in variants if v.model == peer and v.name in by_name}
    for variant in variants:
        row = by_name[variant.name]
        same = None if variant.model == peer or variant.checkpointing else peer_by_key.get(variant.switch_key)
        for key, base in (("vs_peer_fp32", by_name.get(f"{peer} fp32")), ("vs_peer_bf16", by_name.get(f"{peer} bf16")),
                          ("vs_peer_same", same)):
            ok = row["status"] == "ok" and base is not None and base["status"] == "ok"
            row[key] = row["images_per_s"] / base["images_per_s"] if ok else None


def _trusted(row: dict, checks: dict, found: dict[str, dict]) -> bool:
    """Measured, and its loss curve is its family's reference or passed the check against it."""
    return row["status"] == "ok" and (row is found.get(row["model"]) or checks.get(row["name"], {}).get("passed", False))


def best_vs_best(rows: list[dict], checks: list[dict], peer: str) -> dict:
    """Each family's fastest trusted row, and unizoo best / peer best; the same for plain fp32."""
    by_check = {c["variant"]: c for c in checks}
    found = references(rows)
    best = {}
    for family in ("unizoo", peer):
        candidates = [r for r in rows if r["model"] == family and _trusted(r, by_check, found)]
        top = max(candidates, key=lambda r: r["images_per_s"], default=None)
        best[family] = None if top is None else {"variant": top["name"], "images_per_s": top["images_per_s"],
                                                 "mfu": top["mfu"]}
    by_name = {r["name"]: r for r in rows}
    fp32 = [by_name.get(f"{family} fp32", {}) for family in ("unizoo", peer)]
    return {
        "unizoo": best["unizoo"], "peer": best[peer],
        "ratio": best["unizoo"]["images_per_s"] / best[peer]["images_per_s"] if best["unizoo"] and best[peer] else None,
        "fp32_ratio": (fp32[0]["images_per_s"] / fp32[1]["images_per_s"]
                       if all(r.get("status") == "ok" for r in fp32) else None),
    }


def explain_slower(pairs, variants, cfg, device, init_states, batches, peer, progress) -> dict[tuple, dict]:
    """Profile one step of each side of every (unizoo, peer) pair of variant names; the top op difference."""
    by_name = {v.name: v for v in variants}
    profiles = {}  # variant name -> self times, each variant profiled once

    def profiled(name: str) -> dict[str, float]:
        if name not in profiles:
            variant = by_name[name]
            step = trainer(variant, cfg, init_states[variant.model], device)
            try:
                with kernel_profiling():
                    step(batches[0])  # compile, warm the allocator
                profiles[name] = self_time_by_op(lambda: step(batches[1]), device)  # the same batch each call
            finally:
                if variant.compile:
                    torch._dynamo.reset()
        return profiles[name]

    found = {}
    for pair in dict.fromkeys(pairs):  # each pair once, in order
        try:
            found[pair] = top_difference(profiled(pair[0]), profiled(pair[1]))
            found[pair]["text"] = why_text(found[pair], peer)
        except Exception as error:  # noqa: BLE001 - a profile that fails leaves the row's numbers alone
            found[pair] = {"text": f"not profiled: {_short(error)}"}
        progress(f"why {pair[0]} vs {pair[1]}: {found[pair]['text']}")
    return found


def run_peer(cfg: PeerConfig, device: torch.device, peaks: dict, variants=VARIANTS, progress=print,
             limits: RowLimits = RowLimits(), explain: bool = True, on_partial=None) -> dict:
    """All variants, loss checks, best vs best, parameter counts and FLOPs, plus the configuration used.

    `on_partial(result)`, where given, gets the result so far after each group of rows (its `partial` says how
    many rows it has, and no row is profiled yet): a run stopped at a time limit (the GPU check's) still leaves
    the rows it measured, where it used to leave nothing.
    """
    families = list(dict.fromkeys(v.model for v in variants))
    peer = next(f for f in families if f != "unizoo")
    cfg = replace(cfg, adaln=cfg.adaln or PEER_ADALN[peer])
    steps = max(cfg.loss_steps, cfg.warmup + cfg.repeats)
    batches = make_batches(cfg, steps, device)
    init_states, flops, params, woken = {}, {}, {}, {}
    for name in sorted(families):
        torch.manual_seed(cfg.seed)
        model = _build(Variant("init", name), cfg)
        params[name] = parameter_count(model)
        woken[name] = len(wake_zero_init(model))
        init_states[name] = {key: value.clone() for key, value in model.state_dict().items()}
        del model
        flops[name] = count_step_flops(name, cfg, batches[0])
        progress(f"peer {name}: {params[name] / 1e6:.2f}M parameters, {flops[name] / 1e9:.4g} GFLOP "
                 f"per training step (forward + backward), {woken[name]} zero-init weights re-drawn")

    def summary(rows: list[dict], checks: list[dict], best: dict, profiles: list[dict]) -> dict:
        return {
            "config": {**asdict(cfg), "steps": steps, "timed_steps": steps - cfg.warmup, "label": cfg.label},
            "peer": peer,
            "timing": "alternating",  # see measure_together; older results timed each row after the other
            "parameters": params,
            "zero_init_weights_redrawn": woken,
            "flops_per_step": flops,
            "tolerance_rel": TOLERANCE,
            "limits": asdict(limits),
            "rows": rows,
            "loss_checks": checks,
            "best_vs_best": best,
            "profiles": profiles,
        }

    measured = {}

    def judged(done) -> tuple[list[dict], list[dict], dict]:
        """The measured rows of the variants `done`, with their ratios, their loss checks and best vs best."""
        rows = [measured[variant.name] for variant in done]
        _add_ratios(rows, done, peer)
        checks = loss_checks(rows)
        return rows, checks, best_vs_best(rows, checks, peer)

    for group in pair_up(variants, peer):
        for row in measure_together(group, cfg, device, init_states, batches, flops, params, peaks, limits):
            measured[row["name"]] = row
            together = "" if len(group) == 1 else f"  (alternating with {next(v.name for v in group if v.name != row['name'])})"
            if row["status"] == "ok":
                progress(f"peer {row['name']:<28} {row['step_ms']:9.1f} ms/step  {row['images_per_s']:8.2f} img/s  "
                         f"{row['peak_mem_mb']:8.1f} MiB  (first step {row['first_step_s']:.1f} s){together}")
            else:
                progress(f"peer {row['name']:<28} {row['status']}")
        if on_partial is not None and len(measured) < len(variants):
            rows, checks, best = judged([variant for variant in variants if variant.name in measured])
            on_partial({**summary(rows, checks, best, []),
                        "partial": f"{len(rows)} of {len(variants)} rows: the run stopped before the others"})
    rows, checks, best = judged(variants)
    # Where unizoo is slower than the peer with the same switches (or best against best): name the op.
    by_name = {r["name"]: r for r in rows}
    peer_by_key = {v.switch_key: v.name for v in variants if v.model == peer}
    same_switches = {v.name: peer_by_key[v.switch_key] for v in variants
                     if v.model == "unizoo" and (by_name[v.name].get("vs_peer_same") or 1.0) < 1.0}
    pairs = sorted(same_switches.items(), key=lambda pair: by_name[pair[0]]["vs_peer_same"])  # slowest first
    if best["ratio"] is not None and best["ratio"] < 1.0:
        pairs.insert(0, (best["unizoo"]["variant"], best["peer"]["variant"]))
    pairs = list(dict.fromkeys(pairs))
    cap = len(pairs) if cfg.max_profiles is None else cfg.max_profiles
    found = explain_slower(pairs[:cap], variants, cfg, device, init_states, batches, peer, progress) if explain else {}
    for pair in pairs[cap:]:
        found[pair] = {"text": f"not profiled: over the limit of {cap} profiles a comparison (max_profiles)"}
    for row in rows:
        pair = (row["name"], same_switches.get(row["name"]))
        row["why"] = found[pair]["text"] if pair in found else None
    if best["ratio"] is not None:
        pair = (best["unizoo"]["variant"], best["peer"]["variant"])
        best["why"] = found[pair]["text"] if pair in found else None
    return summary(rows, checks, best, [{"unizoo": pair[0], "peer": pair[1], **value} for pair, value in found.items()])
