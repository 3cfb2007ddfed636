"""Training throughput of every design-space variant: each cell of the study grid, each stage, each size.

The grid is data (``recipes/studies/design_space.yaml``, see ``unizoo.studies.study``): axes of recipe-group choices, such as
representation vae|clip, objective mse|flow_matching and strategy joint|sequential. For
each cell and each generator size, the harness composes ``default`` with the cell's
overrides and the throughput setting (64 px images: 256 VAE latent tokens against 64
pooled CLIP tokens). It then builds the model with ``build_model``. It does not call
``prepare``, because weights do not change the amount of work, so nothing is pretrained.
For every stage of the cell's strategy it times one full training step:

* ``set_stage(stage)``, then an optimizer built the way ``UnifiedModel.configure_optimizers``
  builds it (the recipe's factory over the parameters that require grad);
* the step: ``stage_terms`` on one fixed synthetic batch (random images in [-1, 1], real
  shapes captions), their weighted sum, backward, optimizer step;
* one untimed step counts the FLOPs (forward + backward, ``FlopCounterMode`` with the
  harness's attention rule, ``measure.count_flops``). Then come ``warmup`` untimed steps
  and ``repeats`` timed ones. The step time is their median;
* peak memory covers the model build and every step, as in the peer benchmark.

Every model of a row is new, built from the same seed. A stage with a generation loss
also gets a breakdown of its step: the time of the representation's ``encode`` (the
target tokens) and of the generator's forward and backward alone on those targets. The
CLIP-vs-VAE section uses this breakdown to say why the images/s ratio is what it is.

A row whose recipe cannot be composed or built, or whose step fails, says
``failed: <reason>``. The other rows still run.
"""

from __future__ import annotations

import gc
import itertools
import math
from dataclasses import asdict, dataclass

import torch
from hydra.utils import instantiate

from unizoo.config.composition import compose_recipe
from unizoo.model import split_batch
from unizoo.studies.study import DESIGN_SPACE, Cell, Study, load_study
from unizoo.training.build import build_model

from .measure import PeakMemory, count_flops, mfu, time_call
from .report import MARKDOWN, _fmt, _table, peaks_markdown

# --quick: the generator keeps its named size, the LM shrinks to one narrow layer (as in
# tests/conftest.py). Image size and token shapes stay: 256 VAE tokens against 64 CLIP tokens.
QUICK_OVERRIDES = (
    "++backbone.config_overrides={hidden_size:32,intermediate_size:64,num_hidden_layers:1,"
    "num_attention_heads:2,num_key_value_heads:1}",
    "backbone.num_queries=4",
)
GENERATION_LOSS = "generation"  # UnifiedModel.loss_functions(): the loss that trains the generator
TARGET_RATIO = 3.0  # the CLIP/VAE images/s speed-up the efficiency line checks for


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class VariantsConfig:
    sizes: tuple[str, ...] = ("tiny", "S")  # generator sizes (generator.size, DIT_SIZES)
    batch: int = 8
    warmup: int = 2
    repeats: int = 5
    select: tuple[str, ...] = ()  # "axis=choice[,choice]": keep only these choices of an axis
    extra_overrides: tuple[str, ...] = ()  # applied after the study's (quick: the shrunk LM)
    study: str = str(DESIGN_SPACE)
    seed: int = 0

    @classmethod
    def quick(cls) -> VariantsConfig:
        return cls(sizes=("tiny",), batch=4, warmup=1, repeats=2, extra_overrides=QUICK_OVERRIDES)


# ---------------------------------------------------------------- one row


def _short(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def _batch(recipe, size: int, device: torch.device, seed: int) -> dict:
    """Random images in [-1, 1] at the recipe's size, and the data set's first training captions."""
    side = recipe.representation.image_size
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(size, 3, side, side, generator=generator) * 2 - 1
    captions = instantiate(recipe.data).prompts("train", size)
    if len(captions) < size:  # a tiny split: repeat its captions
        captions = list(itertools.islice(itertools.cycle(captions), size))
    return {"image": images.to(device), "caption": captions}


def _build(recipe, stage, device: torch.device, seed: int):
    torch.manual_seed(seed)
    # Built on its device: at size XL (1.65B parameters with the EMA copy) initialising on a 2-core host took 16 s
    # and the copy to the GPU more, in every XL row of the GPU check's variants step. On a CPU nothing changes.
    with device:
        model = build_model(recipe)
    model.to(device)
    model.set_stage(stage)
    model.train()
    # As UnifiedModel.configure_optimizers, minus the LR schedule (it does not change the work).
    optimizer = model.optimizer_factory([p for p in model.parameters() if p.requires_grad])
    return model, optimizer


def _forward_backward(model, optimizer, batch) -> None:
    optimizer.zero_grad(set_to_none=True)
    model.total_loss(model.stage_terms(batch)).backward()


def _breakdown(model, stage, batch, device, cfg: VariantsConfig) -> dict:
    """Time of the target encoding and of the generator's own forward + backward in this step."""
    if GENERATION_LOSS not in stage.losses:
        return {"generation_images": 0, "target_encode_ms": None, "generator_ms": None, "generator_flops": None}
    part = split_batch(batch, stage.mixture, list(stage.losses))[GENERATION_LOSS]
    with torch.no_grad():
        targets = model.representation.encode(part["image"])
        condition = model.conditioning(model.backbone, part["caption"])

    def generator_step():
        model.generator.zero_grad(set_to_none=True)
        loss = model.objective.loss(model.generator, targets, condition)
        if loss.requires_grad:  # a stage may keep the generator frozen
            loss.backward()

    encode = time_call(lambda: model.representation.encode(part["image"]), device, cfg.warmup, cfg.repeats)
    generator = time_call(generator_step, device, cfg.warmup, cfg.repeats)
    return {
        "generation_images": len(part["caption"]),
        "target_encode_ms": encode.median_s * 1e3,
        "generator_ms": generator.median_s * 1e3,
        "generator_flops": count_flops(generator_step),
    }


def _measure(recipe, stage, device: torch.device, cfg: VariantsConfig) -> dict:
    """Build, count, time and break down one stage; the model is freed on return."""
    batch = _batch(recipe, cfg.batch, device, cfg.seed)
    with PeakMemory(device) as memory:
        model, optimizer = _build(recipe, stage, device, cfg.seed)
        flops = count_flops(lambda: _forward_backward(model, optimizer, batch))
        optimizer.step()  # the counting step is a whole (untimed) step too

        def step():
            _forward_backward(model, optimizer, batch)
            optimizer.step()

        timing = time_call(step, device, cfg.warmup, cfg.repeats)
    tokens, token_dim = model.representation.token_shape
    return {
        "timing": timing, "flops": flops, "memory_bytes": memory.bytes, "tokens": tokens, "token_dim": token_dim,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "breakdown": _breakdown(model, stage, batch, device, cfg),
    }


def measure_row(cell: Cell, size: str, stage, recipe, device: torch.device, peaks: dict, cfg: VariantsConfig) -> dict:
    """One (cell, stage, size): the step's throughput, FLOPs, MFU, memory and breakdown."""
    row = _row_head(cell, size, stage.name, cfg)
    try:
        measured = _measure(recipe, stage, device, cfg)
    except Exception as error:  # noqa: BLE001 - one variant failing must not stop the others
        return {**row, "status": f"failed: {_short(error)}"}
    finally:
        gc.collect()
    timing, flops, tokens = measured["timing"], measured["flops"], measured["tokens"]
    seconds = timing.median_s
    images_per_s = cfg.batch / seconds
    return {
        **row,
        "tokens_per_image": tokens,
        "token_dim": measured["token_dim"],
        "params": measured["params"],
        "trainable_params": measured["trainable_params"],
        "step_ms": seconds * 1e3,
        "times_ms": [t * 1e3 for t in timing.times_s],
        "images_per_s": images_per_s,
        "tokens_per_s": images_per_s * tokens,
        "flops_per_step": flops,
        "tflops_per_s": flops / seconds / 1e12,
        "mfu": mfu(flops, seconds, peaks.get("fp32", {}).get("flops_per_s")),
        "peak_mem_mb": measured["memory_bytes"] / 2**20,
        **measured["breakdown"],
    }


def _row_head(cell: Cell, size: str, stage: str | None, cfg: VariantsConfig) -> dict:
    return {"name": cell.name, **cell.choices, "stage": stage, "size": size, "batch": cfg.batch,
            "precision": "fp32", "status": "ok"}


def cell_rows(cell: Cell, size: str, study: Study, device, peaks, cfg: VariantsConfig, progress=print) -> list[dict]:
    """Every stage of ``cell``'s strategy at generator ``size``; a recipe that fails gives one failed row."""
    overrides = [*cell.overrides, *study.throughput, f"generator.size={size}", *cfg.extra_overrides]
    try:
        recipe = compose_recipe(study.recipe, overrides)
        stages = instantiate(recipe.strategy).stages
    except Exception as error:  # noqa: BLE001 - the other cells still run
        row = {**_row_head(cell, size, None, cfg), "status": f"failed: {_short(error)}", "overrides": overrides}
        progress(f"variants {cell.name:<28} {size:<5} {row['status']}")
        return [row]
    rows = []
    for stage in stages:
        row = {**measure_row(cell, size, stage, recipe, device, peaks, cfg), "overrides": overrides}
        rows.append(row)
        label = f"variants {cell.name:<28} {stage.name:<13} {size:<5}"
        if row["status"] == "ok":
            progress(f"{label} {row['step_ms']:9.1f} ms/step {row['images_per_s']:8.2f} img/s "
                     f"{row['tokens_per_s']:10.0f} tok/s ({row['tokens_per_image']} tok/img) "
                     f"{row['peak_mem_mb']:7.1f} MiB")
        else:
            progress(f"{label} {row['status']}")
    return rows


# ---------------------------------------------------------------- CLIP vs VAE


def _why(vae: dict, clip: dict, ratio: float) -> str:
    """Where the step time goes, and what keeps the ratio below the target (an Amdahl split)."""
    if vae["generator_ms"] is None:
        return "no generation loss in this stage: the target is never encoded, both variants do the same work"
    if ratio >= TARGET_RATIO:
        return f"reaches {TARGET_RATIO:g}x"

    def split(row):
        rest = max(0.0, row["step_ms"] - row["target_encode_ms"] - row["generator_ms"])
        return {"encoder": row["target_encode_ms"], "generator": row["generator_ms"], "rest": rest}

    before, after = split(vae), split(clip)
    speedup = vae["generator_ms"] / clip["generator_ms"]
    flop_ratio = vae["generator_flops"] / clip["generator_flops"] if clip["generator_flops"] else math.inf
    fixed = (after["encoder"] + after["rest"]) / clip["step_ms"]
    times = ", ".join(f"{name} {before[name]:.1f} -> {after[name]:.1f} ms" for name in before)
    text = (f"generator {speedup:.1f}x faster on {vae['tokens_per_image']} -> {clip['tokens_per_image']} tokens "
            f"({flop_ratio:.1f}x fewer FLOPs), but encoder + rest, which do not scale with the target's tokens, "
            f"are {fixed:.0%} of the CLIP step ({times})")
    if speedup < TARGET_RATIO <= flop_ratio:
        text += "; the generator is too small to turn its FLOP saving into time (per-op overhead)"
    return text


def clip_vs_vae(rows: list[dict]) -> list[dict]:
    """Each measured CLIP row against the VAE row of the same other choices, stage and size."""
    def key(row):
        return tuple((k, v) for k, v in row["cell"].items() if k != "representation") + (row["stage"], row["size"])

    ok = [r for r in rows if r["status"] == "ok" and "representation" in r["cell"]]
    vae = {key(r): r for r in ok if r["cell"]["representation"] == "vae"}
    pairs = []
    for clip in (r for r in ok if r["cell"]["representation"] == "clip"):
        base = vae.get(key(clip))
        if base is None:
            continue
        ratio = clip["images_per_s"] / base["images_per_s"]
        others = {k: v for k, v in clip["cell"].items() if k != "representation"}
        pairs.append({
            "size": clip["size"], **others, "stage": clip["stage"], "vae": base["name"], "clip": clip["name"],
            "vae_images_per_s": base["images_per_s"], "clip_images_per_s": clip["images_per_s"],
            "vae_tokens_per_image": base["tokens_per_image"], "clip_tokens_per_image": clip["tokens_per_image"],
            "ratio": ratio, "reaches_target": ratio >= TARGET_RATIO,
            "flop_ratio": base["flops_per_step"] / clip["flops_per_step"],
            "generation_loss": base["generator_ms"] is not None,
            "why": _why(base, clip, ratio),
        })
    return pairs


# ---------------------------------------------------------------- run and report


def run_variants(cfg: VariantsConfig, device: torch.device, peaks: dict, progress=print, on_partial=None) -> dict:
    """Every (cell, stage, size) row and the CLIP/VAE pairs, plus the configuration and the grid used.

    `on_partial(result)`, where given, gets the result so far after each cell of each size but the last (its
    `partial` says how many of the cells it has): a run stopped at a time limit still leaves its rows.
    """
    study = load_study(cfg.study)
    cells = study.cells(study.parse_select(cfg.select))

    def result(rows: list[dict]) -> dict:
        return {
            "config": {**asdict(cfg), "label": _label(cfg, study)},
            "study": {"path": study.path, "recipe": study.recipe, "axes": study.axes, "common": study.common,
                      "throughput": study.throughput, "cells": [c.name for c in cells]},
            "target_ratio": TARGET_RATIO,
            "rows": rows,
            "clip_vs_vae": clip_vs_vae(rows),
        }

    rows = []
    every = list(itertools.product(cfg.sizes, cells))
    for done, (size, cell) in enumerate(every, start=1):
        for row in cell_rows(cell, size, study, device, peaks, cfg, progress):
            rows.append({**row, "cell": dict(cell.choices)})
        if on_partial is not None and done < len(every):
            on_partial({**result(list(rows)), "partial": f"{done} of {len(every)} cells and sizes: the run stopped before the others"})
    return result(rows)


def _label(cfg: VariantsConfig, study: Study) -> str:
    setting = " ".join(study.throughput) or "the recipe's own sizes"
    quick = " (quick: a one-layer LM)" if cfg.extra_overrides == QUICK_OVERRIDES else ""
    return f"{study.recipe} recipe, {setting}, batch {cfg.batch}, generator sizes {', '.join(cfg.sizes)}{quick}"


def _ratio_lines(result: dict) -> list[str]:
    """One line per generator size: every CLIP/VAE images/s ratio and whether it reaches the target."""
    target, lines = result["target_ratio"], []
    for size in result["config"]["sizes"]:
        pairs = [p for p in result["clip_vs_vae"] if p["size"] == size]
        if not pairs:
            lines.append(f"CLIP/VAE images/s, generator {size}: no CLIP/VAE pair measured.")
            continue
        generating = [p for p in pairs if p["generation_loss"]]
        reached = sum(p["reaches_target"] for p in generating)
        items = "; ".join(
            f"{'/'.join(str(v) for k, v in p.items() if k in result['study']['axes'])}/{p['stage']} "
            f"{p['ratio']:.2f}x ({'reaches' if p['reaches_target'] else 'below'} {target:g}x)"
            for p in pairs
        )
        lines.append(f"CLIP/VAE images/s, generator {size}: {items}. "
                     f"{reached} of {len(generating)} stages with a generation loss reach {target:g}x.")
    return lines


def variants_markdown(result: dict, peaks: dict) -> str:
    axes = [a for a in result["study"]["axes"] if a != "representation"]
    rows = []
    for r in result["rows"]:
        rows.append([
            r["name"], r["stage"] or "–", r["size"], str(r["batch"]), str(r.get("tokens_per_image", "–")),
            _fmt(r.get("step_ms"), 1), _fmt(r.get("images_per_s")), _fmt(r.get("tokens_per_s"), 0),
            _fmt(r["flops_per_step"] / 1e9 if r.get("flops_per_step") else None, 3),
            _fmt(r.get("mfu"), percent=True), _fmt(r.get("peak_mem_mb"), 0),
            _fmt(r.get("target_encode_ms"), 1), _fmt(r.get("generator_ms"), 1), r["status"],
        ])
    header = ["variant", "stage", "generator", "batch", "tokens/image", "step (ms)", "images/s", "tokens/s",
              "GFLOP/step", "MFU (fp32 peak)", "peak memory (MiB)", "target encode (ms)", "generator fwd+bwd (ms)",
              "status"]
    pairs = [[p["size"], *(str(p.get(a, "–")) for a in axes), p["stage"], _fmt(p["vae_images_per_s"]),
              _fmt(p["clip_images_per_s"]), f"{p['ratio']:.2f}x", f"{p['flop_ratio']:.2f}x",
              "yes" if p["reaches_target"] else "no", p["why"]] for p in result["clip_vs_vae"]]
    pair_header = ["generator", *axes, "stage", "VAE images/s", "CLIP images/s", "CLIP/VAE", "FLOPs VAE/CLIP",
                   f">= {result['target_ratio']:g}x", "why"]
    cfg = result["config"]
    parts = [
        f"### One training step per variant and stage: {cfg['label']}",
        *([f"**Partial: {result['partial']}.**"] if result.get("partial") else []),
        "Each row: a fixed synthetic batch (random images in [-1, 1], shapes captions) through the stage's "
        "losses (weighted sum), backward and the recipe's optimizer step; no pretraining (weights do not change "
        f"the work). Median of {cfg['repeats']} timed steps after {cfg['warmup']} untimed and one FLOP-counting "
        "step. tokens/s = images/s x the generator's tokens per image, also for stages without a generation "
        "loss; images/s counts the whole batch, also when a stage splits it between losses. FLOPs: forward + "
        "backward matmul/conv/attention (model FLOPs). MFU: over the measured fp32 matmul peak. Peak memory: "
        "model build and every step. Target encode / generator fwd+bwd: the stage's generation part alone "
        "(the representation's encode; the generator's forward and backward on its targets), timed separately.",
        _table(header, rows),
        "### CLIP vs VAE targets (BLIP3-o's efficiency argument)",
        f"CLIP features pooled to fewer tokens than VAE latents should train the generator faster. The ratio "
        f"is CLIP images/s over VAE images/s at the same other choices, stage and generator size; the check "
        f"is whether it reaches {result['target_ratio']:g}x. Why: the step split into encoder (target "
        "encode), generator (its forward + backward) and rest (step minus both: LM, understanding loss, "
        "optimizer, per-op overhead). Only the generator's work scales with the target's tokens.",
        *_ratio_lines(result),
        _table(pair_header, pairs) if pairs else "(no CLIP/VAE pair)",
        peaks_markdown(peaks),
    ]
    return "\n\n".join(parts)


MARKDOWN.setdefault("variants", variants_markdown)  # report.write_results("variants", ...) finds it here
