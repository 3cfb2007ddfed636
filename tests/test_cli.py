"""The command line: exit status 2 and one clear paragraph for user mistakes, never a traceback."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import subprocess
import sys

import pytest
import torch

import unizoo
from unizoo.cli import main
from unizoo.runtime.precision import bf16_if_native, cpu_computes_bf16


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unizoo.cli", *args], capture_output=True, text=True, timeout=300)


def test_unknown_representation_exits_2_listing_choices():
    result = run_cli("train", "representation=nope")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "representation" in result.stderr and "nope" in result.stderr and "vae" in result.stderr


@pytest.mark.parametrize("override", ["representation=nope", "optimiser.lr=1", "trainer.devices=0"])
def test_a_bad_key_choice_or_device_exits_before_the_training_stack_is_imported(override):
    """Lightning, diffusers and transformers take ~8 s to import on 2 cores; these mistakes need none of them."""
    code = ("import sys; from unizoo.cli import main; "
            f"status = main(['train', {override!r}]); "
            "print(status, sorted(m for m in ('lightning', 'diffusers', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.split()[0] == "2" and result.stdout.strip().endswith("[]"), (result.stdout, result.stderr[-2000:])
    assert override.partition("=")[0] in result.stderr and "Traceback" not in result.stderr


def test_unknown_key_exits_2():
    result = run_cli("recipe", "default", "optimiser.lr=1")
    assert result.returncode == 2
    assert "optimiser.lr" in result.stderr and "optimizer" in result.stderr
    assert "Traceback" not in result.stderr


def test_recipe_prints_the_composed_recipe(capsys):
    assert main(["recipe", "default", "generator.size=S"]) == 0
    out = capsys.readouterr().out
    assert "size: S" in out and "_target_: unizoo.components.generators.dit.dit" in out


def test_bad_component_value_exits_2(tiny_overrides, capsys):
    assert main(["train", *tiny_overrides, "generator.size=XXL"]) == 2
    err = capsys.readouterr().err
    assert "XXL" in err and "tiny" in err


def test_sample_on_a_missing_run_dir_exits_2(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "nowhere"), "--prompt", "a red circle"]) == 2
    assert "not a unizoo run directory" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"unizoo {unizoo.__version__}\n"


BAD_SETTINGS = {
    # override -> the start of the one paragraph `unizoo train` prints (after "unizoo train: ")
    "trainer.devices=0": "trainer.devices=0: expected a number of devices of at least 1, -1 (all of them), 'auto', "
                         "or a list of GPU indices such as [0, 1]",
    "evaluation.prompts=-1": "evaluation.prompts must be an integer of at least 1, got -1.",
    "data.batch_size=0": "data.batch_size must be an integer of at least 1, got 0.",
    "compile=sometimes": "compile must be true or false or 'auto', got 'sometimes'.",
}
if not torch.cuda.is_available():
    BAD_SETTINGS["trainer.accelerator=gpu"] = "trainer.accelerator=gpu but this machine has no CUDA GPU that torch"
if importlib.util.find_spec("xformers") is None:
    BAD_SETTINGS["generator.attention_backend=xformers"] = (
        "the recipe does not build: generator.attention_backend=xformers cannot run on cpu in "
    )


@pytest.mark.parametrize("override", list(BAD_SETTINGS))
def test_a_setting_that_cannot_work_exits_2_before_any_pretraining(override, tmp_path, monkeypatch, capsys):
    # The real default recipe, not shrunk: the refusal must come before its minutes of VAE pretraining.
    cache = tmp_path / "cache"
    monkeypatch.setenv("UNIZOO_CACHE", str(cache))
    assert main(["train", f"run_root={tmp_path / 'runs'}", override]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"unizoo train: {BAD_SETTINGS[override]}"), error
    assert override.partition("=")[0] in error  # the key is named
    assert "Traceback" not in error
    assert not (tmp_path / "runs").exists()  # no run directory was made
    assert not cache.exists()  # nothing was pretrained


def test_env_names_versions_devices_and_what_auto_picks(capsys):
    assert main(["env"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"unizoo {unizoo.__version__}"
    assert f"- python: {platform.python_version()} ({sys.executable})" in lines
    assert any(line.startswith(f"- torch: {torch.__version__} (") for line in lines)
    for package in ("lightning", "diffusers", "transformers"):
        assert f"- {package}: {importlib.metadata.version(package)}" in lines
    if importlib.util.find_spec("xformers") is None:
        assert "- xformers: not installed" in lines
    devices = lines[lines.index("- devices:") + 1 :]
    assert devices[0].startswith("  - cpu: ") and ("bf16 native: yes" in devices[0]) == cpu_computes_bf16()
    assert sum(line.startswith("  - cuda:") for line in devices) == torch.cuda.device_count()
    if not torch.cuda.is_available():
        precision = bf16_if_native("auto")
        assert f"- default trainer: accelerator auto -> cpu (no CUDA GPU), precision {precision}" in lines
        dtype = "bfloat16" if precision == "bf16-mixed" else "float32"
        attention = next(line for line in lines if line.startswith("- attention for the default DiT"))
        assert attention.startswith(f"- attention for the default DiT (64 tokens, head dim 32, {dtype} on cpu): auto -> ")
        assert ("- the generator and the backbone's language model while a stage trains them: compile auto -> eager "
                "(cpu: compiling the default generator and language model took 81 s on a 2-core CPU and pays back after "
                "about 2,400 steps (the default stage has 1,500); "
                "compile=true compiles anyway)") in lines


def test_env_says_when_xformers_kernels_did_not_load(monkeypatch, capsys):
    import types

    from unizoo import environment

    broken = types.ModuleType("xformers")
    broken.__version__ = "0.0.35"
    build = types.SimpleNamespace(torch_version="2.10.0+cu128")
    broken._cpp_lib = types.SimpleNamespace(_cpp_library_load_exception=types.SimpleNamespace(build_info=build))
    monkeypatch.setitem(sys.modules, "xformers", broken)
    monkeypatch.setattr(environment, "_version", lambda package: "0.0.35" if package == "xformers" else "1.0")
    assert environment.xformers_status() == (
        f"0.0.35, its kernels did not load (built for torch 2.10.0+cu128, this is {torch.__version__}): "
        "attention auto falls back to sdpa"
    )
