"""`compile`: the training calls of a generation stage through `torch.compile` where it pays, and never a crash because of it.

* `compile: auto` (the default) compiles on CUDA and not on the CPU. On a GPU the default
  recipe's eager step waits on the host dispatching each of its ~1,400 operators (README,
  "What the host pays per step"), whatever the GPU computes; compiled, a module's forward
  and backward are a few fused kernels each. On a 2-core Xeon, with an empty inductor cache,
  compiling the default generator and language model took 81 s and the stage then stepped in
  216 ms against eager's 249, so it pays back after about 2,400 steps where the default stage
  has 1,500 (benchmarks/results/cpu-*/first_run.md).
  `true` and `false` decide it on any device.
* What compiles (`compiled_modules`), in a stage that trains the generator: the generator
  (852 of the step's 1,359 operators on the 2-core Xeon, benchmarks/step_parts.py), whose
  inputs have the same shapes at every step, so it compiles once; and the backbone's
  language model (425), which the conditioning runs on the captions. Its input is as long as
  the batch's longest caption: a batch of another length compiles it once more, with the
  length symbolic (dynamo's automatic dynamic shapes), and every later length runs that graph.
  Each compiling call is logged and counted in `compile_seconds`. The tokenizer, the frozen
  encoder, the loss and the optimiser stay eager.
* Only their training calls, while the stage trains. Calls without gradients (validation,
  evaluation inside the stage) run eager, and so does everything after the stage: each
  module is restored when it ends.
* A module is compiled in place (what `nn.Module.compile` does), so parameter names, and
  with them checkpoints, the EMA and sharding, are the same as eager. Forward hooks a caller
  puts on its layers for one call (`conditioning: layerwise` reads every layer's states so)
  run in the compiled call as in eager.
* A compile that fails (no C++ compiler, a Triton that does not match torch, an operator the
  backend cannot lower) falls back to eager for that module for the rest of the stage, with
  one log line saying why. The backward graph is lowered together with the forward
  (`force_non_lazy_backward_lowering`), so its failure is caught the same way, in the
  forward call, instead of inside Lightning's backward.
* Every module compiled this way shares one entry point in dynamo's cache, which by default
  keeps 8 compiled variants and then runs further ones eager without an error. Compiling
  here allows up to `ARCHITECTURES_PER_PROCESS` variants (a process that trains many
  recipes, e.g. tests or a notebook looping over them, compiles two or three per recipe),
  and past that the limit is a compile failure like any other: eager, with the log line.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import lightning as L
import torch
from torch import nn
from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException
from torch._dynamo.utils import counters

log = logging.getLogger(__name__)

AUTO = "auto"
BACKEND = "inductor"  # torch.compile's default; tests substitute lighter ones
# Compiled variants dynamo keeps for the entry point every compiled module shares, where torch's default is 8:
# a recipe compiles its generator once and its language model once or twice (a second caption length).
ARCHITECTURES_PER_PROCESS = 64


def compile_seconds(trainer: L.Trainer) -> float | None:
    """How long the stage `trainer` fitted spent in its modules' compiling calls (the first, and any that compiled
    again); None where nothing compiled."""
    return next((c.compile_seconds for c in trainer.callbacks if isinstance(c, CompiledStage)), None)


def compiled_modules(model: nn.Module) -> dict[str, nn.Module]:
    """What `compile` compiles in a stage that trains the generator, by the name the log gives it."""
    return {"the generator": model.generator, "the backbone's language model": model.backbone.language_model}


def resolve_compile(setting: Any, device: torch.device) -> tuple[bool, str]:
    """`(compile?, why)` for the recipe's `compile` value on `device`; why is what the log says."""
    if setting is True or setting is False:
        return setting, "set in the recipe"
    if setting != AUTO:
        raise ValueError(f"compile={setting!r}: valid choices: auto, true, false")
    if device.type == "cuda":
        return True, ("cuda: eager, the step waits on the host launching one kernel per operator; compiled, the "
                      "generator's and the language model's forward and backward are a few fused kernels each")
    return False, (f"{device.type}: compiling the default generator and language model took 81 s on a 2-core CPU "
                   "and pays back after about 2,400 steps (the default stage has 1,500); compile=true compiles anyway")


def _backward_lowered_with_forward() -> contextlib.AbstractContextManager:
    """Lower the backward graph when the forward compiles, so a backward that cannot compile fails
    in the forward call, where eager can take over, not in the trainer's backward call."""
    if hasattr(torch._functorch.config, "force_non_lazy_backward_lowering"):
        return torch._functorch.config.patch(force_non_lazy_backward_lowering=True)
    return contextlib.nullcontext()  # a torch without the switch: a backward failure is raised where it happens


def _room_for_every_architecture() -> contextlib.AbstractContextManager:
    """A new architecture compiles rather than running eager in silence once dynamo holds 8 others;
    past `ARCHITECTURES_PER_PROCESS`, reaching the limit raises, so the fallback says so."""
    return torch._dynamo.config.patch(recompile_limit=_variants_kept(), fail_on_recompile_limit_hit=True)


def _variants_kept() -> int:
    return max(torch._dynamo.config.recompile_limit, ARCHITECTURES_PER_PROCESS)


def _graphs_captured() -> int:
    """Graphs dynamo has captured in this process so far: a call that raises the count compiled."""
    return counters["stats"]["unique_graphs"]


def _why(error: BaseException) -> str:
    """What the fallback's log line says of `error`: the backend's own error, or the limit reached."""
    if isinstance(error, FailOnRecompileLimitHit):
        return (f"this process already compiled {_variants_kept()} variants of it, as many as dynamo keeps "
                "(recompile_limit, at least ARCHITECTURES_PER_PROCESS while unizoo compiles)")
    # A backend's own error arrives wrapped by dynamo (BackendCompilerFailed): name the backend's.
    cause = getattr(error, "inner_exception", None) or error
    message = str(cause).strip()
    return type(cause).__name__ + (f": {message.splitlines()[0][:300]}" if message else "")


class CompiledCall:
    """`module(...)` through `torch.compile(**options)` while on, eager again if compiling fails.

    `on()` makes the module's own `__call__` run the compiled code: the attribute it reads
    (`nn.Module.compile` sets the same), so no wrapper module renames its parameters. The
    first call compiles (forward and backward). Any error it raises, and a failed
    recompilation later, turns compilation off for good and the call runs again eager, so an
    error eager would raise too is still raised, from the eager call.
    """

    def __init__(self, module: nn.Module, what: str, **options: Any) -> None:
        self.module, self.what = module, what
        self.compiled = torch.compile(module._call_impl, **options)
        self.failed = False
        self.compile_seconds: float | None = None

    def on(self) -> None:
        if not self.failed:
            self.module._compiled_call_impl = self

    def off(self) -> None:
        self.module._compiled_call_impl = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            # Validation and evaluation inside the stage (a few batches every so often) run eager:
            # compiling a no-grad graph for them, at their batch sizes, would cost more than it saves.
            return self.module._call_impl(*args, **kwargs)
        started = time.perf_counter()
        first = self.compile_seconds is None
        graphs = _graphs_captured()
        try:
            with _backward_lowered_with_forward(), _room_for_every_architecture():
                output = self.compiled(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any failure of the compiling call means: run eager
            # After the first call, only a failed recompilation falls back; an error of the step itself
            # (out of memory, a wrong shape) is the run's to report, not compile's.
            if not first and not isinstance(error, (TorchDynamoException, FailOnRecompileLimitHit)):
                raise
            self.failed = True
            self.off()
            log.warning("compile: %s could not be compiled (%s); it runs eager from here on", self.what, _why(error))
            return self.module._call_impl(*args, **kwargs)
        seconds = time.perf_counter() - started
        if first:
            self.compile_seconds = seconds
            log.info("compile: %s compiled in %.1f s (its first training step, forward and backward)", self.what, seconds)
        elif _graphs_captured() > graphs:  # e.g. captions of another length: counted as compile time too
            self.compile_seconds += seconds
            log.info("compile: %s compiled again in %.1f s (a training call whose inputs differ in shape or kind from "
                     "those it compiled for)", self.what, seconds)
        return output


class CompiledStage(L.Callback):
    """While a stage trains, its `compiled_modules` run compiled when `compile` says so (see the module's docstring)."""

    def __init__(self, setting: Any, stage: str) -> None:
        self.setting, self.stage = setting, stage
        self.calls: list[CompiledCall] = []
        self.compile_seconds: float | None = None  # the stage's compilation, once it ran; for metrics.json

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        enabled, why = resolve_compile(self.setting, pl_module.device)
        modules = compiled_modules(pl_module)
        log.info("compile: %s -> %s for stage %s (%s)", str(self.setting).lower(),
                 " and ".join(modules) + " compiled" if enabled else "eager", self.stage, why)
        if enabled:
            self.calls = [CompiledCall(module, what, backend=BACKEND) for what, module in modules.items()]
            for call in self.calls:
                call.on()

    def _restore(self) -> None:
        if self.calls:
            for call in self.calls:
                call.off()
            seconds = [call.compile_seconds for call in self.calls if call.compile_seconds is not None]
            self.compile_seconds = sum(seconds) if seconds else None
            self.calls = []

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
