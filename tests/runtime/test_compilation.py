"""`compile`: the generator compiled while a stage trains it, and eager wherever compiling fails."""

from __future__ import annotations

import csv
import json
import logging

import pytest
import torch
from torch import nn
from torch._dynamo.backends.common import aot_autograd

from conftest import TINY_OVERRIDES
from unizoo.config.composition import compose_recipe
from unizoo.runtime import compilation
from unizoo.runtime.compilation import CompiledCall, resolve_compile
from unizoo.training.build import build_model
from unizoo.training.train import train

# aot_eager runs the same capture and autograd split as inductor without generating code: the
# mechanics under test, in a second instead of inductor's ~20 s on 2 cores.
LIGHT_BACKEND = "aot_eager"


def test_auto_compiles_on_cuda_and_not_on_the_cpu():
    compiled, why = resolve_compile("auto", torch.device("cuda"))
    assert compiled and why.startswith("cuda: eager, the step waits on the host launching one kernel per operator")
    compiled, why = resolve_compile("auto", torch.device("cpu"))
    assert not compiled and why == ("cpu: compiling the default generator and language model took 81 s on a 2-core CPU "
                                    "and pays back after about 2,400 steps (the default stage has 1,500); compile=true "
                                    "compiles anyway")
    assert resolve_compile(True, torch.device("cpu")) == (True, "set in the recipe")
    assert resolve_compile(False, torch.device("cuda")) == (False, "set in the recipe")
    with pytest.raises(ValueError, match="compile='sometimes': valid choices: auto, true, false"):
        resolve_compile("sometimes", torch.device("cpu"))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(approximate="tanh"), nn.Linear(16, 4))


def _loss_and_grads(module: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    loss = module(inputs).square().sum()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in module.parameters()]


def test_a_compiled_module_keeps_its_parameter_names_its_loss_and_its_gradients():
    eager, compiled = _mlp(), _mlp()
    call = CompiledCall(compiled, "the mlp", backend=LIGHT_BACKEND)
    call.on()
    inputs = torch.randn(5, 8)
    with torch.no_grad():  # validation, evaluation: eager, nothing compiled for them
        torch.testing.assert_close(compiled(inputs), eager(inputs))
    assert call.compile_seconds is None
    loss, grads = _loss_and_grads(compiled, inputs)
    expected_loss, expected_grads = _loss_and_grads(eager, inputs)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no `_orig_mod.` in a checkpoint
    torch.testing.assert_close(loss, expected_loss)
    for grad, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected)
    assert compiled._compiled_call_impl is call and call.compile_seconds is not None and not call.failed
    call.off()
    assert compiled._compiled_call_impl is None  # eager again: evaluation and sampling run on it


def _no_compiler(graph, example_inputs):
    raise RuntimeError("no working C++ compiler (simulated)\nthe rest of its report")


def _backward_cannot_lower(graph, example_inputs):
    raise NotImplementedError("this backward cannot be lowered (simulated)")


@pytest.mark.parametrize("backend, reason", [
    (_no_compiler, "RuntimeError: no working C++ compiler (simulated)"),
    # A forward that compiles and a backward that does not: without lowering the backward with the forward,
    # this would fail inside the trainer's backward call, where nothing can fall back.
    (aot_autograd(fw_compiler=lambda graph, _: graph, bw_compiler=_backward_cannot_lower),
     "NotImplementedError: this backward cannot be lowered (simulated)"),
])
def test_a_module_that_cannot_compile_runs_eager_and_the_log_says_why(backend, reason, caplog):
    eager, module = _mlp(), _mlp()
    call = CompiledCall(module, "the mlp", backend=backend)
    call.on()
    inputs = torch.randn(5, 8)
    with caplog.at_level(logging.WARNING, logger="unizoo"):
        loss, grads = _loss_and_grads(module, inputs)
        again, _ = _loss_and_grads(module, inputs)
    expected_loss, expected_grads = _loss_and_grads(eager, inputs)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(again, expected_loss)
    for grad, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected)
    warnings = [r.getMessage() for r in caplog.records if r.name == "unizoo.runtime.compilation" and r.levelno >= logging.WARNING]
    assert warnings == [f"compile: the mlp could not be compiled ({reason}); it runs eager from here on"]  # once
    assert call.failed and module._compiled_call_impl is None
    call.on()  # a later stage's request does not bring back what failed
    assert module._compiled_call_impl is None


def test_an_error_eager_raises_too_is_still_raised():
    module = _mlp()
    CompiledCall(module, "the mlp", backend=LIGHT_BACKEND).on()
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        module(torch.randn(5, 3))


def _fails_at_run_time(graph, example_inputs):
    def run(*inputs):
        raise RuntimeError("out of memory (simulated)")
    return run


def test_after_the_first_step_an_error_of_the_step_itself_is_raised_not_hidden_by_a_fallback(caplog):
    module = _mlp()
    call = CompiledCall(module, "the mlp", backend=LIGHT_BACKEND)
    call.on()
    module(torch.randn(5, 8)).sum().backward()  # compiled
    call.compiled = torch.compile(module._call_impl, backend=_fails_at_run_time)  # a later step runs out of memory
    with caplog.at_level(logging.WARNING, logger="unizoo"), pytest.raises(RuntimeError, match="out of memory"):
        module(torch.randn(5, 8))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # no "could not be compiled": it did not fail
    assert not call.failed


def _losses(run_dir) -> list[float]:
    with (run_dir / "logs" / "generation" / "metrics.csv").open() as file:
        return [float(row["train/loss"]) for row in csv.DictReader(file) if row.get("train/loss")]


@pytest.mark.parametrize("conditioning", ["queries", "layerwise", "joint_attention"])
def test_a_stage_trains_compiled_to_the_losses_of_eager(conditioning, tmp_path, monkeypatch, caplog):
    # layerwise and joint_attention read the language model's layers through forward hooks put on for one
    # call (backbone.hidden_states): the compiled call runs them as eager does.
    monkeypatch.setattr(compilation, "BACKEND", LIGHT_BACKEND)
    runs = {}
    for setting in ("true", "false"):
        recipe = compose_recipe("default", [*TINY_OVERRIDES, f"run_root={tmp_path / setting}", "strategy.steps=4",
                                            f"compile={setting}", f"conditioning={conditioning}"])
        with caplog.at_level(logging.INFO, logger="unizoo"):
            runs[setting] = train(recipe)
    said = [r.getMessage() for r in caplog.records if r.name == "unizoo.runtime.compilation"]
    assert said[0] == ("compile: true -> the generator and the backbone's language model compiled for stage generation "
                       "(set in the recipe)")
    # The step runs the language model (the condition) before the generator: each compiles in its first call.
    assert said[1].startswith("compile: the backbone's language model compiled in ")
    assert said[2].startswith("compile: the generator compiled in ")
    assert said[3] == "compile: false -> eager for stage generation (set in the recipe)"
    assert len(said) == 4  # trainer.val_check_interval=2: validation ran eager, nothing compiled again
    compiled, eager = _losses(runs["true"]), _losses(runs["false"])
    assert len(compiled) == 4
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    throughput = json.loads((runs["true"] / "metrics.json").read_text())["training"]["generation"]
    assert 0 < throughput["compile_seconds"] < throughput["train_seconds"]
    assert throughput["images_per_s_after_compile"] > throughput["images_per_s"]
    assert "compile_seconds" not in json.loads((runs["false"] / "metrics.json").read_text())["training"]["generation"]


def test_captions_of_another_length_compile_the_language_model_once_more_and_then_no_more(caplog):
    torch._dynamo.reset()
    model = build_model(compose_recipe("default", TINY_OVERRIDES))
    backbone = model.backbone.train()
    words = "a red circle left of a blue square and a green triangle above two yellow squares".split()
    batches = [[" ".join(words[:length - row % 3]) for row in range(4)] for length in (8, 5, 12, 10, 5)]
    assert [backbone.tokenize(captions)[0].shape[1] for captions in batches] == [8, 5, 12, 10, 5]
    eager = [backbone.condition(captions).detach() for captions in batches]
    backend = _CountingBackend()
    call = CompiledCall(backbone.language_model, "the backbone's language model", backend=backend)
    call.on()
    with caplog.at_level(logging.INFO, logger="unizoo"):
        for captions, expected in zip(batches, eager, strict=True):
            condition = backbone.condition(captions)
            condition.sum().backward()
            torch.testing.assert_close(condition.detach(), expected)
    # The first length compiles; the second compiles it again with the length symbolic, which every later length runs.
    assert backend.graphs == 2 and not call.failed
    said = [r.getMessage() for r in caplog.records if r.name == "unizoo.runtime.compilation"]
    assert len(said) == 2 and said[0].startswith("compile: the backbone's language model compiled in ")
    assert said[1].startswith("compile: the backbone's language model compiled again in ")
    assert said[1].endswith(" s (a training call whose inputs differ in shape or kind from those it compiled for)")
    seconds = [float(line.split(" in ")[1].split(" s ")[0]) for line in said]
    assert call.compile_seconds == pytest.approx(sum(seconds), abs=0.1)  # both compiles are the stage's compile time
    call.off()


def _architecture(depth: int) -> nn.Module:
    """One more distinct architecture per depth: dynamo compiles a variant for each."""
    torch.manual_seed(depth)
    return nn.Sequential(*[nn.Linear(8, 8) for _ in range(depth)], nn.Tanh())


class _CountingBackend:
    """Runs the captured graph as it is and counts the graphs it was given."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph, example_inputs):
        self.graphs += 1
        return graph.forward


def test_more_architectures_than_dynamo_keeps_by_default_each_compile(caplog):
    # Every module compiled in place shares one entry point in dynamo's cache, which keeps 8 variants by
    # default and then runs the next ones eager without an error, while the log would say "compiled".
    torch._dynamo.reset()
    backend = _CountingBackend()
    with caplog.at_level(logging.WARNING, logger="unizoo"):
        for depth in range(1, 12):
            module = _architecture(depth)
            call = CompiledCall(module, f"architecture {depth}", backend=backend)
            call.on()
            _loss_and_grads(module, torch.randn(4, 8))
            assert backend.graphs == depth and not call.failed, depth
            call.off()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_past_the_limit_an_architecture_runs_eager_and_the_log_says_why(monkeypatch, caplog):
    torch._dynamo.reset()
    monkeypatch.setattr(compilation, "ARCHITECTURES_PER_PROCESS", 2)
    backend = _CountingBackend()
    with torch._dynamo.config.patch(recompile_limit=1), caplog.at_level(logging.WARNING, logger="unizoo"):
        calls = []
        for depth in (1, 2, 3):
            module, eager = _architecture(depth), _architecture(depth)
            call = CompiledCall(module, f"architecture {depth}", backend=backend)
            call.on()
            inputs = torch.randn(4, 8)
            loss, grads = _loss_and_grads(module, inputs)
            expected_loss, expected_grads = _loss_and_grads(eager, inputs)
            torch.testing.assert_close(loss, expected_loss)
            for grad, expected in zip(grads, expected_grads, strict=True):
                torch.testing.assert_close(grad, expected)
            calls.append(call)
            call.off()
    assert backend.graphs == 2 and [c.failed for c in calls] == [False, False, True]
    warnings = [r.getMessage() for r in caplog.records if r.name == "unizoo.runtime.compilation" and r.levelno >= logging.WARNING]
    # Torch's own limit is 1 here and unizoo's 2: compiling allows the larger, and the line names it.
    assert warnings == ["compile: architecture 3 could not be compiled (this process already compiled 2 variants of it, as "
                        "many as dynamo keeps (recompile_limit, at least ARCHITECTURES_PER_PROCESS while unizoo compiles)); "
                        "it runs eager from here on"]
