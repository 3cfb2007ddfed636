"""The default recipe's bare training step against the whole Lightning step: what the training loop costs.

* **bare**: one fixed batch already on the device; the stage's losses under the trainer's
  precision (autocast as Lightning applies it), backward, gradient clipping at the
  trainer's value, the recipe's optimiser step. Model, loss, backward and optimiser:
  nothing else.
* **whole**: `trainer.fit` of the generation stage with the Trainer and callbacks
  `unizoo train` builds for it (`unizoo.training.stage_callbacks.stage_trainer`): batches
  drawn by the data module's loader with their items' indices, which the target memo keeps
  the frozen encoder's tokens under (inside the first epoch, as here, it keeps and reads
  none back), the step's own seeded generator, the non-finite-loss
  guard, the EMA update, periodic checkpoints and validation at the recipe's intervals,
  the loss log (CSV), the progress display. Timed from step `warmup` to the end of the
  fit, so the window holds the recipe's periodic work in proportion (with the default
  `steps` of 500 and `warmup` of 20: one checkpoint and one validation, as in every 500
  steps of a real stage).

Both start from the same freshly built model (random weights: the work per step is the
same; nothing is pretrained), and both run the generator and the backbone's language model as
the recipe's `compile` says (compiled on CUDA by default; `--loop-override compile=false`
measures them eager; the row's `generator_compiled` says which). The whole
steps are timed in `blocks`, and the bare steps run before, between and after them in the
same fit, so that each block is compared with bare steps of the same minutes (`_Interleaved`).
Overhead = whole step time / bare step time - 1, with the blocks' lowest and highest. Where
the difference goes is measured apart: drawing a batch through the loader, and one EMA update.

What the host pays per step, whatever the batch, is measured apart too: the operators one
bare step dispatches (views, which launch nothing, not counted), and the bare step on one
image of the batch. A step of the whole batch cannot take less than that, so batch / (the
one-image step) bounds the images/s of the eager step on that machine. The bound is what
decides where the device computes a step of this small model faster than the host can
dispatch it (the case on a GPU it is measured for): then only fewer operators or a captured
graph raise it, not a faster kernel. Which part of the step pays it is measured part by part
(`benchmarks.step_parts`): the encoder, the tokenizer, the conditioning, the generator's loss,
the optimiser, each on one image and on the batch.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from unizoo.config.composition import compose_recipe
from unizoo.data.target_memo import index_training_items
from unizoo.runtime import compilation
from unizoo.runtime.fabric import loops_on
from unizoo.runtime.library_chatter import quiet_library_chatter
from unizoo.training.build import build_model
from unizoo.training.ema import update_average
from unizoo.training.run_loggers import logger_factory
from unizoo.training.stage_callbacks import stage_trainer

from .measure import OperatorCount, synchronize, time_call
from .step_parts import clip_and_step, step_parts, trainer_autocast
from .report import MARKDOWN, _fmt, _table, peaks_markdown
from .cached_targets import QUICK_OVERRIDES


@dataclass(frozen=True)
class LoopConfig:
    steps: int = 500  # timed steps of the whole loop (the recipe checkpoints and validates every 500)
    warmup: int = 20
    bare_steps: int = 100  # timed bare steps, before the whole loop (for the host's table) and again between its blocks
    blocks: int = 10  # the timed whole steps in this many blocks, with bare steps before, between and after them
    extra_overrides: tuple[str, ...] = ()
    seed: int = 0

    @classmethod
    def quick(cls) -> LoopConfig:
        return cls(steps=6, warmup=2, bare_steps=4, blocks=2, extra_overrides=(
            *QUICK_OVERRIDES, "data.batch_size=4", "checkpoint.every_n_steps=4", "trainer.val_check_interval=4"))


class _Interleaved(L.Callback):
    """The whole steps timed in blocks, with bare steps on the fixed batch before, between and after the blocks.

    A shared machine's speed drifts over minutes: bare steps timed before the whole loop only, as this
    benchmark did until 2026-12-07, gave overheads of 1.2% to 16.5% within one hour. Each block is held
    to the bare steps on either side of it, which ran the same minute. A block is timed from the end of
    the bare steps before it to the end of its last step, so its batches' loading, hooks, EMA updates,
    and a periodic checkpoint or validation falling in it, are in it; the device is synchronised only at
    the blocks' ends, so inside a block the host runs ahead of the device as in a real run.
    """

    def __init__(self, bare_step: Callable[[], None], cfg: LoopConfig, device: torch.device) -> None:
        self.bare_step, self.device, self.warmup = bare_step, device, cfg.warmup
        self.block_steps = max(1, cfg.steps // cfg.blocks)
        self.bare_per_side = max(1, cfg.bare_steps // (cfg.blocks + 1))
        self.bare: list[list[float]] = []  # ms of each bare step, one list per side (before block 0, after each block)
        self.whole: list[tuple[float, int]] = []  # (ms, steps) of each block
        self.mark: float | None = None
        self.steps_in_block = 0

    def _bare_side(self) -> None:
        timing = time_call(self.bare_step, self.device, warmup=0, repeats=self.bare_per_side)
        self.bare.append([seconds * 1e3 for seconds in timing.times_s])
        self.mark = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx + 1 < self.warmup:
            return
        if self.mark is not None:
            self.steps_in_block += 1
            if self.steps_in_block < self.block_steps and trainer.global_step < trainer.max_steps:
                return
            synchronize(self.device)
            self.whole.append(((time.perf_counter() - self.mark) * 1e3, self.steps_in_block))
            self.steps_in_block = 0
        self._bare_side()

    def blocks(self) -> list[dict]:
        """Each block's mean whole step, the bare step beside it (the mean of its two sides' medians), its overhead."""
        rows = []
        for number, (ms, steps) in enumerate(self.whole):
            bare = (statistics.median(self.bare[number]) + statistics.median(self.bare[number + 1])) / 2
            rows.append({"steps": steps, "whole_step_ms": ms / steps, "bare_step_ms": bare, "overhead": ms / steps / bare - 1})
        return rows


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
    device_type = next(model.parameters()).device.type

    def step(batch: dict) -> None:
        with trainer_autocast(recipe, device_type):
            losses = model.stage_losses(batch)
            total = sum(model.stage.losses[name] * value for name, value in losses.items())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        clip_and_step(model, optimizer, recipe)

    return step


def bare_step_ms(model, recipe, batch: dict, device: torch.device, cfg: LoopConfig) -> list[float]:
    """Seconds (as ms) of each timed bare step on `batch`: losses, backward, clipping, optimiser."""
    step = _bare_stepper(model, recipe)
    timing = time_call(lambda: step(batch), device, cfg.warmup, cfg.bare_steps)
    return [seconds * 1e3 for seconds in timing.times_s]


def operators_per_step(model, recipe, batch: dict) -> dict:
    """Operators one bare step on `batch` dispatches (forward under autocast, backward, clipping, optimiser), and its views."""
    step = _bare_stepper(model, recipe)
    step(batch)  # the optimiser's state exists from here on, as in every later step
    count = OperatorCount()
    with count:
        step(batch)
    return {"operators_per_step": count.operators, "views_per_step": count.views}


def interleaved_steps(model, bare_step: Callable[[], None], recipe, device: torch.device, cfg: LoopConfig,
                      run_dir: Path) -> _Interleaved:
    """`trainer.fit` of the stage, its last `cfg.steps` steps timed in blocks with bare steps between them."""
    (stage,) = instantiate(recipe.strategy).stages
    timing = _Interleaved(bare_step, cfg, device)
    trainer = stage_trainer(recipe, stage, [stage], run_dir, logger_factory(recipe)(run_dir, stage.name), [timing])
    datamodule = instantiate(recipe.data, _convert_="all")
    datamodule.setup("fit")
    index_training_items(datamodule)  # as `unizoo train` does: the target memo's bookkeeping is part of the loop
    trainer.fit(model, datamodule=datamodule)
    return timing


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
        # The bare step runs the generator and the language model as the stage's trainer will (`compile`:
        # compiled on CUDA by default), so the overhead compares like with like.
        compiled, why = compilation.resolve_compile(OmegaConf.select(recipe, "compile", default=compilation.AUTO), device)
        progress(f"loop: generator and language model {'compiled' if compiled else 'eager'} ({why})")
        if compiled:
            for what, module in compilation.compiled_modules(bare_model).items():
                compilation.CompiledCall(module, f"the bare step's {what.removeprefix('the ')}", backend=compilation.BACKEND).on()
        images = fixed_batch(recipe, device)
        bare_alone = bare_step_ms(bare_model, recipe, images, device, cfg)
        one_image = bare_step_ms(bare_model, recipe, first_items(images, 1), device, cfg)
        parts = parts_ms(bare_model, recipe, device, cfg)
        operators = operators_per_step(bare_model, recipe, images)
        by_part = step_parts(bare_model, recipe, {"one_image": first_items(images, 1), "batch": images}, device,
                             warmup=2, repeats=min(20, cfg.bare_steps))
        alone_ms, one_image_ms = statistics.median(bare_alone), statistics.median(one_image)
        progress(f"loop: bare step {alone_ms:.1f} ms (median of {len(bare_alone)}), "
                 f"{one_image_ms:.1f} ms on one image; {operators['operators_per_step']} operators per step")
        for part in by_part:
            progress(f"loop: {part['part']}: {part['operators']} operators, {part['one_image_ms']:.2f} ms on one image, "
                     f"{part['batch_ms']:.2f} ms on the batch")
        step = _bare_stepper(bare_model, recipe)
        timing = interleaved_steps(model, lambda: step(images), recipe, device, cfg, Path(tmp))
        del bare_model, step
    blocks = timing.blocks()
    timed = sum(b["steps"] for b in blocks)
    whole = sum(b["whole_step_ms"] * b["steps"] for b in blocks) / timed
    bare_ms = sum(b["bare_step_ms"] * b["steps"] for b in blocks) / timed  # each block's bare step, weighted as the block
    overheads = [b["overhead"] for b in blocks]
    progress(f"loop: whole Lightning step {whole:.1f} ms over {timed} steps in {len(blocks)} blocks, the bare step "
             f"beside them {bare_ms:.1f} ms")
    batch = recipe.data.batch_size
    row = {
        "recipe": "default", "batch": batch, "precision": str(recipe.trainer.precision), "device": str(device),
        "generator_compiled": compiled,
        "bare_step_ms": bare_ms, "bare_times_ms": [t for side in timing.bare for t in side],
        "whole_step_ms": whole, "whole_steps_timed": timed, "blocks": blocks,
        "bare_images_per_s": batch / bare_ms * 1e3, "whole_images_per_s": batch / whole * 1e3,
        "overhead": whole / bare_ms - 1, "overhead_low": min(overheads), "overhead_high": max(overheads),
        "bare_step_ms_alone": alone_ms, "bare_alone_times_ms": bare_alone, **parts,
        "one_image_step_ms": one_image_ms, "one_image_times_ms": one_image,
        "eager_ceiling_images_per_s": batch / one_image_ms * 1e3, **operators, "step_parts": by_part,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        # The whole step's target memo (training items indexed as `unizoo train` indexes them): items kept, items read.
        "memo_items_kept": len(model.target_memo.rows), "memo_items_read": model.target_memo.read,
    }
    progress(f"loop: overhead {100 * row['overhead']:.1f}% (blocks {100 * row['overhead_low']:.1f}% to "
             f"{100 * row['overhead_high']:.1f}%; {row['whole_images_per_s']:.1f} vs {row['bare_images_per_s']:.1f} images/s)")
    label = "default recipe, generation stage" + (f", {', '.join(cfg.extra_overrides)}" if cfg.extra_overrides else "")
    return {"config": {**asdict(cfg), "label": label}, "rows": [row]}


def _alone(row: dict) -> float:
    """The bare step timed beside the one-image step, before the whole loop (earlier results: their only bare step)."""
    return row.get("bare_step_ms_alone", row["bare_step_ms"])


def _range(row: dict) -> str:
    """The blocks' overheads (results written before 2026-12-07 timed one block)."""
    if "overhead_low" not in row:
        return ""
    return f" (blocks: {_fmt(row['overhead_low'], percent=True)} to {_fmt(row['overhead_high'], percent=True)})"


def loop_markdown(result: dict, peaks: dict) -> str:
    cfg = result["config"]
    rows = [[
        r["device"], r["precision"], "compiled" if r.get("generator_compiled") else "eager", str(r["batch"]),
        _fmt(r["bare_step_ms"], 1), _fmt(r["whole_step_ms"], 1),
        _fmt(r["bare_images_per_s"], 1), _fmt(r["whole_images_per_s"], 1), _fmt(r["overhead"], percent=True) + _range(r),
        _fmt(r["loader_ms"], 2), _fmt(r["ema_update_ms"], 2),
    ] for r in result["rows"]]
    header = ["device", "precision", "generator and LM (`compile`)", "batch", "bare step (ms)", "whole step (ms)",
              "bare images/s", "whole images/s", "loop overhead", "loader: one batch (ms)", "EMA: one update (ms)"]
    parts = [
        f"### The training loop's cost: {cfg['label']}",
        "Bare step: one fixed batch on the device, the stage's losses under the trainer's precision, backward, "
        "gradient clipping, the optimiser step. Whole step: `trainer.fit` with the Trainer and callbacks "
        "`unizoo train` uses (loader, target memo, step seeding, non-finite guard, EMA, checkpoints and validation at the recipe's "
        f"intervals, CSV loss log, progress), mean over steps {cfg['warmup']} to {cfg['warmup'] + cfg['steps']}, timed in "
        f"{cfg.get('blocks', 1)} blocks. Bare steps ran before, between and after the blocks, inside the same fit "
        "(a shared machine's speed drifts over minutes), and each block is held to the median bare step on its two "
        "sides; the bare step here is those, weighted as their blocks. Loop overhead: whole / bare - 1; in brackets, "
        "the lowest and highest block's (the block with the recipe's checkpoint and validation is the highest). The "
        "last two columns are parts of the whole step outside the bare one, measured apart. Random weights: the work "
        "per step is that of a trained model.",
        _table(header, rows),
    ]
    host_rows = [[
        r["device"], str(r["operators_per_step"]), str(r["views_per_step"]), _fmt(r["one_image_step_ms"], 1),
        _fmt(_alone(r), 1), _fmt(r["eager_ceiling_images_per_s"], 0), _fmt(r["batch"] / _alone(r) * 1e3, 1),
    ] for r in result["rows"] if "operators_per_step" in r]  # results written before these were measured lack them
    if host_rows:
        parts += [
            "What the host pays per step, whatever the batch: the operators one bare step dispatches (views, which "
            "launch nothing, apart), and the same bare step on the batch's first image only. A step of the whole batch "
            "cannot take less than the one-image step, so batch / one-image step bounds the images/s of this "
            "step on this machine. The bare step here is the one timed beside it, before the whole loop. Where the "
            "bare step is close to the one-image step, the host's dispatching, not the arithmetic, is the step's cost. The operators are those of the eager step even where the generator and language model are "
            "compiled: under a dispatch counter, torch.compile's code runs eager.",
            _table(["device", "operators per step", "views per step", "bare step, one image (ms)",
                    "bare step, batch (ms)", "ceiling: batch / one-image step (images/s)", "bare images/s"],
                   host_rows),
        ]
    parts += [_parts_markdown(r) for r in result["rows"] if r.get("step_parts")]  # measured from 2026-12-07 on
    parts.append(peaks_markdown(peaks))
    return "\n\n".join(parts)


def _parts_markdown(row: dict) -> str:
    """Which part of the bare step pays the host's cost (`benchmarks.step_parts`), with the whole step under it."""
    rows = [[p["part"], str(p["operators"]), _fmt(p["one_image_ms"], 2), _fmt(p["batch_ms"], 2)] for p in row["step_parts"]]
    rows.append([
        "sum of the parts", str(sum(p["operators"] for p in row["step_parts"])),
        _fmt(sum(p["one_image_ms"] for p in row["step_parts"]), 2), _fmt(sum(p["batch_ms"] for p in row["step_parts"]), 2)])
    rows.append(["the bare step (the table above)", str(row["operators_per_step"]), _fmt(row["one_image_step_ms"], 2),
                 _fmt(_alone(row), 2)])
    return "\n\n".join([
        f"Where the bare step's time goes on {row['device']}, part by part: each part of the generation loss run apart as "
        "the step runs it (median of synchronised calls), on the batch's first image (what the host pays) and on the "
        "whole batch, with the operators it dispatches. The tokenizer launches nothing and grows with the batch: it "
        "is host time at any batch size. Run apart, each part's backward starts from its "
        "own seed gradient, so their sum is near the bare step's, not equal to it.",
        _table(["part", "operators", "one image (ms)", "batch (ms)"], rows),
    ])


MARKDOWN.setdefault("loop", loop_markdown)  # report.write_results finds it here
