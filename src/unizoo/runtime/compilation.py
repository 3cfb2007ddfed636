"""`compile`: the generator's training step through `torch.compile` where it pays, and never a crash because of it.

* `compile: auto` (the default) compiles on CUDA and not on the CPU. On a GPU the default
  recipe's eager step waits on the host dispatching each of its ~1,400 operators (README,
  "What the host pays per step"), whatever the GPU computes; compiled, the generator's forward
  and backward are a few fused kernels each. On a 2-core Xeon, compiling the default
  generator took 51 s and saved 16 ms of a 245 ms step, so it pays back after about 3,200
  steps where the default stage has 1,500 (benchmarks/results/cpu-*/first_run.md).
  `true` and `false` decide it on any device.
* Only the generator, and only its training calls while a stage trains it. Its inputs have
  the same shapes at every step (the representation's tokens, the conditioning's tokens), so
  it compiles once; the backbone reads captions whose length varies from batch to batch.
  Calls without gradients (validation, evaluation inside the stage) run eager, and so does
  everything after the stage: the generator is restored when it ends.
* The module is compiled in place (what `nn.Module.compile` does), so parameter names, and
  with them checkpoints, the EMA and sharding, are the same as eager.
* A compile that fails (no C++ compiler, a Triton that does not match torch, an operator the
  backend cannot lower) falls back to eager for the rest of the stage, with one log line
  saying why. The backward graph is lowered together with the forward
  (`force_non_lazy_backward_lowering`), so its failure is caught the same way, in the
  forward call, instead of inside Lightning's backward.
* Every module compiled this way shares one entry point in dynamo's cache, which by default
  keeps 8 compiled variants and then runs further ones eager without an error. Compiling
  here allows one variant per generator architecture up to `ARCHITECTURES_PER_PROCESS` (a
  process that trains many variants, e.g. tests or a notebook looping over recipes), and
  past that the limit is a compile failure like any other: eager, with the log line.
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

log = logging.getLogger(__name__)

AUTO = "auto"
BACKEND = "inductor"  # torch.compile's default; tests substitute lighter ones
# Compiled variants dynamo keeps for the entry point every compiled module shares: one per generator
# architecture (a stage's shapes are fixed, so one architecture compiles once), where torch's default is 8.
ARCHITECTURES_PER_PROCESS = 64


def compile_seconds(trainer: L.Trainer) -> float | None:
    """How long the stage `trainer` fitted spent compiling the generator; None where it ran eager."""
    return next((c.compile_seconds for c in trainer.callbacks if isinstance(c, CompiledGenerator)), None)


def resolve_compile(setting: Any, device: torch.device) -> tuple[bool, str]:
    """`(compile?, why)` for the recipe's `compile` value on `device`; why is what the log says."""
    if setting is True or setting is False:
        return setting, "set in the recipe"
    if setting != AUTO:
        raise ValueError(f"compile={setting!r}: valid choices: auto, true, false")
    if device.type == "cuda":
        return True, ("cuda: eager, the step waits on the host launching one kernel per operator; compiled, the "
                      "generator's forward and backward are a few fused kernels")
    return False, (f"{device.type}: compiling the default generator took 51 s on a 2-core CPU and pays back after "
                   "about 3,200 steps (the default stage has 1,500); compile=true compiles anyway")


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
        if first:
            self.compile_seconds = time.perf_counter() - started
            log.info("compile: %s compiled in %.1f s (its first training step, forward and backward)", self.what,
                     self.compile_seconds)
        return output


class CompiledGenerator(L.Callback):
    """While a stage trains, the generator runs compiled when `compile` says so (see the module's docstring)."""

    def __init__(self, setting: Any, stage: str) -> None:
        self.setting, self.stage = setting, stage
        self.call: CompiledCall | None = None
        self.compile_seconds: float | None = None  # the stage's compilation, once it ran; for metrics.json

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        enabled, why = resolve_compile(self.setting, pl_module.device)
        log.info("compile: %s -> %s for stage %s (%s)", str(self.setting).lower(),
                 "the generator compiled" if enabled else "eager", self.stage, why)
        if enabled:
            self.call = CompiledCall(pl_module.generator, "the generator", backend=BACKEND)
            self.call.on()

    def _restore(self) -> None:
        if self.call is not None:
            self.call.off()
            self.compile_seconds = self.call.compile_seconds
            self.call = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
