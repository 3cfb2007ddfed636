"""A training step with on-the-fly target encoding against one that reads pre-extracted targets (`targets=DIR`).

For each representation (VAE latents, CLIP features) the harness composes the default
recipe (generation only, the first run's shape) with that representation, builds the model
with ``build_model`` and writes a target cache of ``items`` training items the way
``unizoo cache-targets`` does (``encoded_batches`` + ``write_shards``), timing the
extraction. It does not call ``prepare``: weights do not change the work, so nothing is
pretrained and the cache holds the random encoder's tokens. Then it times full training
steps through the real data path, twice on the same model: batches from the data module's
training loader, once as they are (the step runs ``representation.encode``) and once with
the cache attached (``attach_cached_targets``: each item also reads its target from the
shards, the step skips the encoder). A step is: the next batch from the loader, the stage's
losses, backward and the recipe's optimizer step; the median of ``repeats`` timed steps
after ``warmup`` untimed ones, with the loader's share (drawing images, reading targets)
reported apart.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from unizoo.config.composition import compose_recipe
from unizoo.data.target_shards import targets_signature, write_shards
from unizoo.data.with_targets import attach_cached_targets
from unizoo.training.build import build_model
from unizoo.training.cache_targets import encoded_batches

from .measure import synchronize
from .report import MARKDOWN, _fmt, _table, peaks_markdown

# --quick: a one-layer LM and a one-block generator (as tests/conftest.py); image size and token shapes stay.
QUICK_OVERRIDES = (
    "++backbone.config_overrides={hidden_size:32,intermediate_size:64,num_hidden_layers:1,"
    "num_attention_heads:2,num_key_value_heads:1}",
    "backbone.num_queries=4",
    "+generator.depth=1",
)
REPRESENTATIONS = {"vae": "representation=vae", "clip": "representation=clip"}


@dataclass(frozen=True)
class TargetsConfig:
    representations: tuple[str, ...] = ("vae", "clip")
    batch: int = 64  # the default recipe's data.batch_size
    warmup: int = 2
    repeats: int = 10
    extra_overrides: tuple[str, ...] = ()
    seed: int = 0

    @classmethod
    def quick(cls) -> TargetsConfig:
        return cls(batch=4, warmup=1, repeats=2, extra_overrides=QUICK_OVERRIDES)

    @property
    def items(self) -> int:
        """Training items cached: enough for every step without a second epoch."""
        return self.batch * (self.warmup + self.repeats + 1)


def _steps(model, optimizer, loader, device: torch.device, cfg: TargetsConfig) -> dict:
    """Median seconds of a whole step and of its loader part, over the timed steps."""
    batches = iter(loader)
    totals, loads = [], []
    for number in range(cfg.warmup + cfg.repeats):
        synchronize(device)
        start = time.perf_counter()
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in next(batches).items()}
        loaded = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model.total_loss(model.stage_terms(batch)).backward()
        optimizer.step()
        synchronize(device)
        if number >= cfg.warmup:
            totals.append(time.perf_counter() - start)
            loads.append(loaded - start)
    return {"step_ms": statistics.median(totals) * 1e3, "load_ms": statistics.median(loads) * 1e3,
            "times_ms": [t * 1e3 for t in totals], "has_target": "target" in batch}


def measure_representation(name: str, device: torch.device, cfg: TargetsConfig, folder: Path) -> dict:
    overrides = [REPRESENTATIONS[name], f"data.batch_size={cfg.batch}", f"data.train_size={cfg.items}",
                 *cfg.extra_overrides]
    recipe = compose_recipe("default", [*overrides, f"targets={folder / name}"])
    torch.manual_seed(cfg.seed)
    model = build_model(recipe).to(device)
    (stage,) = instantiate(recipe.strategy).stages
    model.set_stage(stage)
    model.train()
    optimizer = model.optimizer_factory([p for p in model.parameters() if p.requires_grad])

    datamodule = instantiate(recipe.data, _convert_="all")
    dataset = datamodule.dataset("train")
    start = time.perf_counter()
    manifest = write_shards(folder / name, targets_signature(recipe),
                            encoded_batches(model.representation, dataset, cfg.batch, 0, device, progress=False), len(dataset))
    extraction_s = time.perf_counter() - start

    on_the_fly = _steps(model, optimizer, datamodule.train_dataloader(), device, cfg)
    cached_module = instantiate(recipe.data, _convert_="all")
    attach_cached_targets(cached_module, recipe)
    cached = _steps(model, optimizer, cached_module.train_dataloader(), device, cfg)
    tokens, channels = model.representation.token_shape
    row = {
        "representation": name, "batch": cfg.batch, "tokens": tokens, "channels": channels, "status": "ok",
        "on_the_fly_step_ms": on_the_fly["step_ms"], "cached_step_ms": cached["step_ms"],
        "on_the_fly_load_ms": on_the_fly["load_ms"], "cached_load_ms": cached["load_ms"],
        "on_the_fly_times_ms": on_the_fly["times_ms"], "cached_times_ms": cached["times_ms"],
        "on_the_fly_images_per_s": cfg.batch / on_the_fly["step_ms"] * 1e3,
        "cached_images_per_s": cfg.batch / cached["step_ms"] * 1e3,
        "speedup": on_the_fly["step_ms"] / cached["step_ms"],
        "cached_batches_had_targets": cached["has_target"] and not on_the_fly["has_target"],
        "items": manifest["items"], "cache_bytes_per_item": manifest["bytes"] / manifest["items"],
        "extraction_images_per_s": manifest["items"] / extraction_s,
        "overrides": overrides,
    }
    del model, optimizer
    gc.collect()
    return row


def run_cached_targets(cfg: TargetsConfig, device: torch.device, peaks: dict, progress=print) -> dict:
    """One row per representation; a representation that fails gives a failed row, the others still run."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="unizoo-targets-bench-") as tmp:
        for name in cfg.representations:
            try:
                row = measure_representation(name, device, cfg, Path(tmp))
            except Exception as error:  # noqa: BLE001 - one representation failing must not stop the other
                row = {"representation": name, "batch": cfg.batch, "status": f"failed: {type(error).__name__}: {error}"[:300]}
            rows.append(row)
            if row["status"] == "ok":
                progress(f"targets {name:<5} on the fly {row['on_the_fly_step_ms']:8.1f} ms/step, from the cache "
                         f"{row['cached_step_ms']:8.1f} ms/step: {row['speedup']:.2f}x")
            else:
                progress(f"targets {name:<5} {row['status']}")
    label = "default recipe (generation only), " + (", ".join(cfg.extra_overrides) if cfg.extra_overrides else "its own sizes")
    return {"config": {**asdict(cfg), "items": cfg.items, "label": label}, "rows": rows}


def cached_targets_markdown(result: dict, peaks: dict) -> str:
    cfg = result["config"]
    rows = [[
        r["representation"], str(r["batch"]), f"{r['tokens']} x {r['channels']}" if "tokens" in r else "–",
        _fmt(r.get("on_the_fly_step_ms"), 1), _fmt(r.get("cached_step_ms"), 1),
        _fmt(r.get("on_the_fly_load_ms"), 1), _fmt(r.get("cached_load_ms"), 1),
        _fmt(r.get("on_the_fly_images_per_s"), 1), _fmt(r.get("cached_images_per_s"), 1),
        f"{r['speedup']:.2f}x" if "speedup" in r else "–",
        _fmt(r.get("extraction_images_per_s"), 1), _fmt(r["cache_bytes_per_item"] / 1e3 if "cache_bytes_per_item" in r else None, 1),
        r["status"],
    ] for r in result["rows"]]
    header = ["representation", "batch", "target (tokens x channels)", "on the fly: step (ms)", "from the cache: step (ms)",
              "on the fly: loader (ms)", "from the cache: loader (ms)", "on the fly: images/s", "from the cache: images/s",
              "speed-up", "cache-targets images/s", "cache kB per image", "status"]
    parts = [
        f"### Training from pre-extracted targets: {cfg['label']}, batch {cfg['batch']}",
        "Each row: one model, the same training steps through the data module's real loader, once encoding "
        "the target in the step and once reading it from a target cache (`unizoo train targets=DIR`). A step "
        "is the loader's next batch, the stage's losses, backward and the optimizer step; median of "
        f"{cfg['repeats']} timed steps after {cfg['warmup']} untimed. Loader: the part of the step spent getting "
        "the batch (drawing images; from the cache also reading each item's target). Speed-up: on-the-fly "
        "step time over cached step time. cache-targets images/s: extraction of the cache "
        f"({cfg['items']} items, encoder forward only), a one-off cost. Untrained weights: the work is the same.",
        _table(header, rows),
        peaks_markdown(peaks),
    ]
    return "\n\n".join(parts)


MARKDOWN.setdefault("cached_targets", cached_targets_markdown)  # report.write_results finds it here
