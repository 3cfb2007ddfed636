"""The command line: exit status 2 and one clear paragraph for user mistakes, never a traceback."""

from __future__ import annotations

import subprocess
import sys

from unizoo.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unizoo.cli", *args], capture_output=True, text=True, timeout=300)


def test_unknown_representation_exits_2_listing_choices():
    result = run_cli("train", "representation=nope")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "representation" in result.stderr and "nope" in result.stderr and "vae" in result.stderr


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
