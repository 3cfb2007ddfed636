"""The default recipe's bare training step against the whole Lightning step: what the training loop costs.

* **bare**: one fixed batch already on the device; the stage's losses under the trainer's
  precision (autocast as Lightning applies it), backward, gradient clipping at the
  trainer's value, the recipe's optimiser step. Model, loss, backward and optimiser:
  nothing else.
* **whole**: `trainer.fit` of the generation stage with the Trainer and callbacks
  `unizoo train` builds for it (`unizoo.training.stage_callbacks.stage_trainer`): batches
  drawn by the data module's loader, the step's own seeded generator, the non-finite-loss
  guard, the EMA update, periodic checkpoints and validation at the recipe's intervals,
  the loss log (CSV), the progress display. Timed from step `warmup` to the end of the
  fit, so the window holds the recipe's periodic work in proportion (with the default
  `steps` of 500 and `warmup` of 20: one checkpoint and one validation, as in every 500
  steps of a real stage).

Both start from the same freshly built model (random weights: the work per step is the
same; nothing is pretrained), and both run the generator as the recipe's `compile` says
(compiled on CUDA by default; `--loop-override compile=false` measures it eager). Overhead =
whole step time / bare step time - 1. Where the difference goes is measured apart: drawing a
batch through the loader, and one EMA update.

What the host pays per step, whatever the batch, is measured apart too: the operators one
bare step dispatches (views, which launch nothing, not counted), and the bare step on one
image of the batch. A step of the whole batch cannot take less than that, so batch / (the
one-image step) bounds the images/s of the eager step on that machine. The bound is what
decides where the device computes a step of this small model faster than the host can
dispatch it (the case on a GPU it is measured for): then only fewer operators or a captured
graph raise it, not a faster kernel.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from unizoo.config.composition import compose_recipe
from unizoo.runtime import compilation
from unizoo.runtime.fabric import loops_on
from unizoo.runtime.library_chatter import quiet_library_chatter
from unizoo.runtime.precision import compute_dtype
from unizoo.training.build import build_model
from unizoo.training.ema import update_average
from unizoo.training.run_loggers import logger_factory
from unizoo.training.stage_callbacks import stage_trainer

from .measure import synchronize
from .report import MARKDOWN, _fmt, _table, peaks_markdown
from .cached_targets import QUICK_OVERRIDES


@dataclass(frozen=True)
class LoopConfig:
    steps: int = 500  # timed steps of the whole loop (the recipe checkpoints and validates every 500)
    warmup: int = 20
    bare_steps: int = 100
    extra_overrides: tuple[str, ...] = ()
    seed: int = 0

    @classmethod
    def quick(cls) -> LoopConfig:
        return cls(steps=6, warmup=2, bare_steps=4, extra_overrides=(*QUICK_OVERRIDES, "data.batch_size=4",
                                                                      "checkpoint.every_n_steps=4", "trainer.val_check_interval=4"))


class _Clock(L.Callback):
    """Wall time from the start of batch `warmup` to the end of the fit (device work included)."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device = warmup, device
        self.started = self.ended = None
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            synchronize(self.device)
            self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.started is not None:
            self.steps += 1

    def on_train_end(self, trainer, pl_module) -> None:
        synchronize(self.device)
        self.ended = time.perf_counter()


def _recipe(cfg: LoopConfig, device: torch.device, steps: int):
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    return compose_recipe("default", [f"trainer.accelerator={accelerator}", f"strategy.steps={steps}", *cfg.extra_overrides])


def fixed_batch(recipe, device: torch.device) -> dict:
    """The training loader's first batch, on `device`: what every bare step runs on."""
    datamodule = instantiate(recipe.data, _convert_="all")
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def first_items(batch: dict, items: int) -> dict:
    """The first `items` images of `batch`, with their captions."""
    return {key: value[:items] for key, value in batch.items()}


def _bare_stepper(model, recipe):
    """A function running one bare step of `model` on a batch: losses under autocast, backward, clipping, optimiser."""
    optimizer = model.optimizer_factory([p for p in model.parameters() if p.requires_grad])
    dtype = compute_dtype(recipe.trainer.precision)
    clip = recipe.trainer.get("gradient_clip_val")
    device_type = next(model.parameters()).device.type

    def step(batch: dict) -> None:
        with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
            losses = model.stage_losses(batch)
            total = sum(model.stage.losses[name] * value for name, value in losses.items())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip)
        optimizer.step()

    return step


def bare_step_ms(model, recipe, batch: dict, device: torch.device, cfg: LoopConfig) -> list[float]:
    """Seconds (as ms) of each timed bare step on `batch`: losses, backward, clipping, optimiser."""
    step = _bare_stepper(model, recipe)
    times = []
    for number in range(cfg.warmup + cfg.bare_steps):
        synchronize(device)
        start = time.perf_counter()
        step(batch)
        synchronize(device)
        if number >= cfg.warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return times


class _OperatorCount(TorchDispatchMode):
    """Counts the aten operators dispatched inside it; views (a new header on the same storage) apart."""

    def __init__(self) -> None:
        super().__init__()
        self.operators = self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if getattr(func, "is_view", False):  # a custom or higher-order operator may not say: counted as an operator
            self.views += 1
        else:
            self.operators += 1
        return func(*args, **(kwargs or {}))


def operators_per_step(model, recipe, batch: dict) -> dict:
    """Operators one bare step on `batch` dispatches (forward under autocast, backward, clipping, optimiser), and its views."""
    step = _bare_stepper(model, recipe)
    step(batch)  # the optimiser's state exists from here on, as in every later step
    count = _OperatorCount()
    with count:
        step(batch)
    return {"operators_per_step": count.operators, "views_per_step": count.views}


def whole_step_ms(model, recipe, device: torch.device, cfg: LoopConfig, run_dir: Path) -> tuple[float, int]:
    """Mean ms of a step of `trainer.fit` over its last `cfg.steps` steps, and how many were timed."""
    (stage,) = instantiate(recipe.strategy).stages
    clock = _Clock(cfg.warmup, device)
    trainer = stage_trainer(recipe, stage, [stage], run_dir, logger_factory(recipe)(run_dir, stage.name), [clock])
    datamodule = instantiate(recipe.data, _convert_="all")
    trainer.fit(model, datamodule=datamodule)
    return (clock.ended - clock.started) * 1e3 / clock.steps, clock.steps


def parts_ms(model, recipe, device: torch.device, cfg: LoopConfig) -> dict:
    """Median ms of two parts of the whole step outside the bare one: drawing a batch, one EMA update."""
    datamodule = instantiate(recipe.data, _convert_="all")
    datamodule.setup("fit")
    batches = iter(datamodule.train_dataloader())
    loads = []
    for _ in range(min(20, cfg.bare_steps)):
        start = time.perf_counter()
        batch = next(batches)
        {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
        synchronize(device)
        loads.append((time.perf_counter() - start) * 1e3)
    emas = []
    for updates in range(min(20, cfg.bare_steps)):
        synchronize(device)
        start = time.perf_counter()
        update_average(model, updates)
        synchronize(device)
        emas.append((time.perf_counter() - start) * 1e3)
    return {"loader_ms": statistics.median(loads), "ema_update_ms": statistics.median(emas)}


def run_loop(cfg: LoopConfig, device: torch.device, peaks: dict, progress=print) -> dict:
    quiet_library_chatter()  # its log reads like a run's: no tips, no warnings a user cannot act on
    total_steps = cfg.warmup + cfg.steps
    recipe = _recipe(cfg, device, total_steps)
    with loops_on(recipe.trainer.accelerator, recipe.trainer.precision), tempfile.TemporaryDirectory(prefix="unizoo-loop-bench-") as tmp:
        torch.manual_seed(cfg.seed)
        model = build_model(recipe)
        (stage,) = instantiate(recipe.strategy).stages
        model.set_stage(stage)
        bare_model = copy.deepcopy(model).to(device).train()
        # The bare step runs the generator as the stage's trainer will (`compile`: compiled on CUDA by
        # default), so the overhead compares like with like.
        compiled, why = compilation.resolve_compile(OmegaConf.select(recipe, "compile", default=compilation.AUTO), device)
        progress(f"loop: generator {'compiled' if compiled else 'eager'} ({why})")
        if compiled:
            compilation.CompiledCall(bare_model.generator, "the bare step's generator", backend=compilation.BACKEND).on()
        images = fixed_batch(recipe, device)
        bare = bare_step_ms(bare_model, recipe, images, device, cfg)
        one_image = bare_step_ms(bare_model, recipe, first_items(images, 1), device, cfg)
        parts = parts_ms(bare_model, recipe, device, cfg)
        operators = operators_per_step(bare_model, recipe, images)
        del bare_model
        bare_ms, one_image_ms = statistics.median(bare), statistics.median(one_image)
        progress(f"loop: bare step {bare_ms:.1f} ms (median of {len(bare)}), "
                 f"{one_image_ms:.1f} ms on one image; {operators['operators_per_step']} operators per step")
        whole, timed = whole_step_ms(model, recipe, device, cfg, Path(tmp))
        progress(f"loop: whole Lightning step {whole:.1f} ms (mean of {timed})")
    batch = recipe.data.batch_size
    row = {
        "recipe": "default", "batch": batch, "precision": str(recipe.trainer.precision), "device": str(device),
        "generator_compiled": compiled,
        "bare_step_ms": bare_ms, "bare_times_ms": bare, "whole_step_ms": whole, "whole_steps_timed": timed,
        "bare_images_per_s": batch / bare_ms * 1e3, "whole_images_per_s": batch / whole * 1e3,
        "overhead": whole / bare_ms - 1, **parts,
        "one_image_step_ms": one_image_ms, "one_image_times_ms": one_image,
        "eager_ceiling_images_per_s": batch / one_image_ms * 1e3, **operators,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    progress(f"loop: overhead {100 * row['overhead']:.1f}% ({row['whole_images_per_s']:.1f} vs {row['bare_images_per_s']:.1f} images/s)")
    label = "default recipe, generation stage" + (f", {', '.join(cfg.extra_overrides)}" if cfg.extra_overrides else "")
    return {"config": {**asdict(cfg), "label": label}, "rows": [row]}


def loop_markdown(result: dict, peaks: dict) -> str:
    cfg = result["config"]
    rows = [[
        r["device"], r["precision"], "compiled" if r.get("generator_compiled") else "eager", str(r["batch"]),
        _fmt(r["bare_step_ms"], 1), _fmt(r["whole_step_ms"], 1),
        _fmt(r["bare_images_per_s"], 1), _fmt(r["whole_images_per_s"], 1), _fmt(r["overhead"], percent=True),
        _fmt(r["loader_ms"], 2), _fmt(r["ema_update_ms"], 2),
    ] for r in result["rows"]]
    header = ["device", "precision", "generator (`compile`)", "batch", "bare step (ms)", "whole step (ms)",
              "bare images/s", "whole images/s", "loop overhead", "loader: one batch (ms)", "EMA: one update (ms)"]
    parts = [
        f"### The training loop's cost: {cfg['label']}",
        "Bare step: one fixed batch on the device, the stage's losses under the trainer's precision, backward, "
        "gradient clipping, the optimiser step (median of "
        f"{cfg['bare_steps']} after {cfg['warmup']} untimed). Whole step: `trainer.fit` with the Trainer and callbacks "
        "`unizoo train` uses (loader, step seeding, non-finite guard, EMA, checkpoints and validation at the recipe's "
        f"intervals, CSV loss log, progress), mean over steps {cfg['warmup']} to {cfg['warmup'] + cfg['steps']}. "
        "Loop overhead: whole / bare - 1. The last two columns are parts of the whole step outside the bare one, "
        "measured apart. Random weights: the work per step is that of a trained model.",
        _table(header, rows),
    ]
    host_rows = [[
        r["device"], str(r["operators_per_step"]), str(r["views_per_step"]), _fmt(r["one_image_step_ms"], 1),
        _fmt(r["bare_step_ms"], 1), _fmt(r["eager_ceiling_images_per_s"], 0), _fmt(r["bare_images_per_s"], 1),
    ] for r in result["rows"] if "operators_per_step" in r]  # results written before these were measured lack them
    if host_rows:
        parts += [
            "What the host pays per step, whatever the batch: the operators one bare step dispatches (views, which "
            "launch nothing, apart), and the same bare step on the batch's first image only. A step of the whole batch "
            "cannot take less than the one-image step, so batch / one-image step bounds the images/s of this "
            "step on this machine. Where the bare step is close to the one-image step, the host's dispatching, not the "
            "arithmetic, is the step's cost. The operators are those of the eager step even where the generator is "
            "compiled: under a dispatch counter, torch.compile's code runs eager.",
            _table(["device", "operators per step", "views per step", "bare step, one image (ms)",
                    "bare step, batch (ms)", "ceiling: batch / one-image step (images/s)", "bare images/s"],
                   host_rows),
        ]
    parts.append(peaks_markdown(peaks))
    return "\n\n".join(parts)


MARKDOWN.setdefault("loop", loop_markdown)  # report.write_results finds it here
