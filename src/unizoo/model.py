"""The LightningModule that wires the components of a recipe.

It knows the interfaces, never the choices: a representation turns images into
target tokens, a backbone turns captions into a condition, an objective turns
(generator, targets, condition) into a loss and samples, an alignment adds its terms
on the generator's hidden states (none adds none), and a strategy's stages say which
parameter groups train and which losses count. Nothing here branches on which
representation, objective, alignment or strategy is in use.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from unizoo.components.conditioning.queries import QueryConditioning
from unizoo.components.alignments.none import NoAlignment
from unizoo.components.strategies.stages import Stage
from unizoo.data.target_memo import TargetMemo
from unizoo.runtime.schedules import warmup_cosine

log = logging.getLogger(__name__)

Batch = dict[str, Any]
# A loss function's terms: name -> (value, weight within the function); the stage's weight multiplies them all.
Terms = dict[str, tuple[torch.Tensor, float]]
# The submodule that holds the generator's running average where the recipe keeps one
# (unizoo.training.ema attaches it): part of every checkpoint, and a sharding unit of its own.
EMA_ATTRIBUTE = "generator_ema"


def split_batch(batch: Batch, mixture: dict[str, float], losses: list[str]) -> dict[str, Batch]:
    """Contiguous slices of one batch per loss, sized by the stage's mixture fractions.

    A loss without a fraction gets the whole batch.
    """
    size = len(batch["caption"])
    parts, start = {}, 0
    for name in losses:
        if name not in mixture:
            parts[name] = batch
            continue
        stop = min(size, start + max(1, round(mixture[name] * size)))
        parts[name] = {key: value[start:stop] for key, value in batch.items()}
        start = stop
    return parts


SHARDED_STACKS = ("generator", "backbone")  # the components whose layer stacks are sharded block by block
STEP_METHODS = ("training_step", "validation_step")


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Within the block, the parameters of `modules` take no gradient (their flags come back after).

    A forward pass under it treats the weights as constants, so a loss computed from it
    trains only what feeds the modules' inputs.
    """
    params = [p for module in modules for p in module.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def shard(model: L.LightningModule, mesh) -> None:
    """Apply `fully_shard` over `mesh` (a no-op without one: other strategies train the module as it is)."""
    if mesh is None or isinstance(model, FSDPModule):
        return
    if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names:
        # ModelParallelStrategy's mesh is (data_parallel, tensor_parallel); given both, fully_shard
        # would replicate over the first and shard over the second (HSDP).
        mesh = mesh["data_parallel"]
    for component in SHARDED_STACKS:
        for stack in getattr(model, component).modules():
            if isinstance(stack, nn.ModuleList):
                for block in stack:
                    fully_shard(block, mesh=mesh)
    average = getattr(model, EMA_ATTRIBUTE, None)
    if average is not None:
        fully_shard(average, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for method in STEP_METHODS:
        register_fsdp_forward_method(model, method)
    held = sum(p.to_local().numel() for p in model.parameters() if isinstance(p, DTensor))
    total = sum(p.numel() for p in model.parameters())
    log.info("fully sharded over %d processes: this one holds %d of %d parameters", mesh.size(), held, total)


class UnifiedModel(L.LightningModule):
    """One backbone for understanding and generation, wired from recipe components."""

    def __init__(
        self,
        representation: nn.Module,
        backbone: nn.Module,
        generator: nn.Module,
        objective: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        warmup_steps: int = 100,
        conditioning: nn.Module | None = None,
        alignment: nn.Module | None = None,
    ) -> None:
        """`alignment`: an auxiliary loss on the generator's hidden states (`components/alignments/`); None = none."""
        super().__init__()
        self.representation = representation
        self.backbone = backbone
        self.generator = generator
        self.objective = objective
        # What the generator reads of the backbone (recipes/conditioning/); None: the query tokens' last states.
        self.conditioning = conditioning if conditioning is not None else QueryConditioning()
        self.alignment = alignment if alignment is not None else NoAlignment()
        self.optimizer_factory = optimizer
        self.warmup_steps = warmup_steps
        self.stage: Stage | None = None
        # The training step's own random stream (noise, noise levels, condition dropout), set per step
        # by the run's seeding callback (unizoo.training.step_seeds); None: the global generator.
        self.step_rng: torch.Generator | None = None
        # The frozen representation's tokens of each training item after their first encoding
        # (unizoo.data.target_memo): emptied at every stage, filled only while the representation is frozen.
        self.target_memo = TargetMemo()

    # ------------------------------------------------------------------ stages
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named groups a stage can train or freeze.

        The alignment's head trains with the generator it reads. A representation names the groups
        it can train (the VAE: "representation", for REPA-E); frozen encoders (CLIP, SSL) name none.
        """
        return {
            **self.backbone.parameter_groups(),
            "generator": [*self.generator.parameters(), *self.alignment.head_parameters()],
            **self.representation.parameter_groups(),
        }

    def set_stage(self, stage: Stage) -> None:
        groups = self.parameter_groups()
        unknown = set(stage.trainable) - set(groups)
        if unknown:
            raise ValueError(
                f"stage {stage.name!r} trains unknown parameter groups {sorted(unknown)}; valid groups: {', '.join(groups)} "
                "(the representation, the backbone and the generator name the groups they have: only a VAE "
                "representation can train, as group 'representation')"
            )
        missing = set(stage.losses) - set(self.loss_functions())
        if missing:
            raise ValueError(
                f"stage {stage.name!r} names unknown losses {sorted(missing)}; valid losses: {', '.join(self.loss_functions())}"
            )
        for name, params in groups.items():
            for param in params:
                param.requires_grad_(name in stage.trainable)
        self.target_memo.reset(enabled=not any(p.requires_grad for p in self.representation.parameters()))
        self.stage = stage

    def loss_functions(self) -> dict[str, Callable[[Batch], Terms]]:
        """The losses a stage may name: each turns its part of the batch into named terms."""
        return {
            "generation": self.generation_loss,
            "understanding": self.understanding_loss,
            "reconstruction": self.reconstruction_loss,
            "representation_alignment": self.representation_alignment_loss,
        }

    def prepare(self, datamodule: L.LightningDataModule) -> None:
        """Make pretrained-by-unizoo weights real (VAE, CLIP, ...): load from cache or train them."""
        self.representation.prepare(datamodule)
        self.backbone.prepare(datamodule)
        self.alignment.prepare(datamodule)

    # ------------------------------------------------------------------ losses
    def generation_loss(self, batch: Batch) -> Terms:
        """Text -> image: the objective's loss on the representation's target tokens, and the alignment's terms."""
        # A batch from a target cache (`targets=DIR`, unizoo.data.with_targets) carries the tokens
        # encode() would return, extracted once for every representation alike; a present-key check,
        # not a branch on the representation.
        targets = batch["target"] if "target" in batch else self.target_memo.tokens(batch, self.representation.encode)
        condition = self.conditioning(self.backbone, batch["caption"])
        with self.alignment.capture(self.generator) as hidden:
            # Detached: the objective's loss never trains the representation (REPA-E's stop-gradient,
            # which keeps the latents from collapsing to what is easiest to denoise); encode() of a
            # frozen representation has no graph to cut anyway.
            generation = self.objective.loss(self.generator, targets.detach(), condition, rng=self.step_rng)
        return {"generation": (generation, 1.0), **self.alignment.terms(hidden, batch["image"])}

    def understanding_loss(self, batch: Batch) -> Terms:
        """Image -> text: the backbone's next-token loss on the caption given the image."""
        return {"understanding": (self.backbone.understanding_loss(batch["image"], batch["caption"]), 1.0)}

    def reconstruction_loss(self, batch: Batch) -> Terms:
        """The representation's own loss (the VAE's reconstruction + KL), for stages that train it (REPA-E)."""
        return {"reconstruction": (self.representation.reconstruction_loss(batch["image"]), 1.0)}

    def representation_alignment_loss(self, batch: Batch) -> Terms:
        """REPA-E: the alignment loss of a generator pass on tokens that keep their graph to the representation.

        The generator, the alignment's head and the condition are held fixed in this pass, so
        the term trains the representation alone: its latents move towards what makes the
        generator's hidden states align. (`generation_loss` trains the generator and the head
        on the same loss, on detached tokens.)
        """
        tokens = self.representation.encode_differentiable(batch["image"])
        with torch.no_grad():  # the condition is held fixed: this term trains the representation alone
            condition = self.conditioning(self.backbone, batch["caption"])
        with frozen(self.generator, self.alignment), self.alignment.capture(self.generator) as hidden:
            # Run for the hidden states (its own loss is not used), on the step's noise stream.
            self.objective.loss(self.generator, tokens, condition, rng=self.step_rng)
            aligned = self.alignment.loss(hidden, batch["image"])
        return {"representation_alignment": (aligned, 1.0)}

    def stage_terms(self, batch: Batch) -> Terms:
        """Every term of the stage's losses, each with its weight in the total (the stage's times the function's)."""
        if self.stage is None:
            raise RuntimeError("call set_stage(stage) before training: the stage decides which losses count")
        names = list(self.stage.losses)
        parts = split_batch(batch, self.stage.mixture, names)
        functions = self.loss_functions()
        return {
            term: (value, self.stage.losses[name] * weight)
            for name in names
            for term, (value, weight) in functions[name](parts[name]).items()
        }

    def stage_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The stage's loss terms by name, unweighted (what is logged as train/<name>)."""
        return {name: value for name, (value, _) in self.stage_terms(batch).items()}

    @staticmethod
    def total_loss(terms: Terms) -> torch.Tensor:
        """The weighted sum the optimiser steps on."""
        return sum(weight * value for value, weight in terms.values())

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        terms = self.stage_terms(batch)
        total = self.total_loss(terms)
        size = len(batch["caption"])
        # Logged as tensors: read on the host only every trainer.log_every_n_steps (and by the
        # progress display every so often), never per step, so the step does not wait for the device.
        self.log_dict({f"train/{name}": value.detach() for name, (value, _) in terms.items()}, batch_size=size)
        self.log("train/loss", total.detach(), batch_size=size)
        return total

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        losses = self.stage_losses(batch)
        self.log_dict({f"val/{name}": value for name, value in losses.items()}, batch_size=len(batch["caption"]), sync_dist=True)

    def configure_model(self) -> None:
        # trainer=fsdp (ModelParallelStrategy) hands over a device mesh; other trainers none.
        shard(self, self.device_mesh)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        # Lightning's mixed-precision plugin refuses to clip for a fused optimiser (it unscales fp16
        # gradients itself), bf16 included, where nothing is scaled. Without a gradient scaler the
        # gradients are the true ones: clip them here, by norm as the trainer asks, on the device.
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None or not gradient_clip_val or gradient_clip_algorithm not in (None, "norm"):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def optimizer_parameters(self) -> list[nn.Parameter] | list[dict[str, Any]]:
        """The trainable parameters; as groups of their own where the stage scales a group's learning rate."""
        trainable = [p for p in self.parameters() if p.requires_grad]
        if not self.stage.learning_rates:
            return trainable
        groups = self.parameter_groups()
        scaled = [
            {"params": [p for p in groups[name] if p.requires_grad], "lr_scale": scale}
            for name, scale in self.stage.learning_rates.items()
        ]
        taken = {id(p) for group in scaled for p in group["params"]}
        return [{"params": [p for p in trainable if id(p) not in taken], "lr_scale": 1.0}, *scaled]

    def make_optimizer(self) -> torch.optim.Optimizer:
        """The recipe's optimiser over the stage's trainable parameters, each group at its rate."""
        optimizer = self.optimizer_factory(self.optimizer_parameters())
        for group in optimizer.param_groups:  # the recipe's rate times the stage's scale (before the schedule reads it)
            group["lr"] *= group.get("lr_scale", 1.0)
        return optimizer

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.make_optimizer()
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.stage.steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(min(self.warmup_steps, total // 2 + 1), total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(
        self, prompts: list[str], steps: int | None = None, guidance: float | None = None, seed: int = 0, batch_size: int = 64,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Images `(len(prompts), 3, H, W)` in [-1, 1]; the same seed gives the same images.

        `steps` / `guidance` of None take the objective's recipe defaults. `noise`
        `(len(prompts), N, C)`: the initial noise to start from (None: `initial_noise(len(prompts), seed)`).
        """
        return self.generate_with_tokens(prompts, steps, guidance, seed, batch_size, noise)[0]

    def initial_noise(self, count: int, seed: int = 0, batch_size: int = 64) -> torch.Tensor:
        """The initial noise `(count, N, C)` `generate` starts `count` prompts from under `seed` (on the CPU)."""
        rng = torch.Generator().manual_seed(seed)
        shape = tuple(self.generator.token_shape)
        return torch.cat([torch.randn((min(batch_size, count - start), *shape), generator=rng) for start in range(0, count, batch_size)])

    @torch.no_grad()
    def generate_with_tokens(
        self, prompts: list[str], steps: int | None = None, guidance: float | None = None, seed: int = 0, batch_size: int = 64,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`generate`'s images and the generated target tokens `(len(prompts), N, C)` they were decoded from."""
        was_training = self.training
        self.eval()
        rng = torch.Generator().manual_seed(seed)
        if noise is None:
            noise = self.initial_noise(len(prompts), seed, batch_size)
        images, generated = [], []
        for start in range(0, len(prompts), batch_size):
            condition = self.conditioning(self.backbone, prompts[start : start + batch_size])
            tokens = self.objective.sample(
                self.generator, condition, steps=steps, guidance=guidance, rng=rng, noise=noise[start : start + batch_size]
            )
            images.append(self.representation.decode(tokens).float().cpu())
            generated.append(tokens.float().cpu())
        self.train(was_training)
        return torch.cat(images), torch.cat(generated)
