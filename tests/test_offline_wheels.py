"""The wheels for a GPU machine without network: what the image lacks, each as the kind of wheel its target installs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a top-level package of the repository, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import offline_wheels  # noqa: E402

PYTHON_312 = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
              "os_name": "posix", "platform_machine": "x86_64", "implementation_name": "cpython",
              "platform_python_implementation": "CPython", "platform_release": "", "platform_version": "",
              "implementation_version": "3.12.3"}


def _item(name: str, version: str, file: str, requires: list[str] = ()) -> dict:
    """One entry of pip's installation report, as `pip install --dry-run --report` writes it."""
    return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)},
            "download_info": {"url": f"https://files.example/packages/{file}"}}


# A report shaped like unizoo's: the image's torch stack, and what only unizoo's other requirements bring.
REPORT = {"install": [
    _item("unizoo", "0.1.0", "main", ["torch>=2.10", "lightning>=2.4", "diffusers>=0.32", "omegaconf>=2.3",
                                      "pytest>=8; extra == 'dev'"]),
    _item("torch", "2.11.0", "torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl", ["filelock", "typing-extensions"]),
    _item("lightning", "2.6.6", "lightning-2.6.6-py3-none-any.whl", ["torch", "PyYAML", "packaging"]),
    _item("diffusers", "0.42.1", "diffusers-0.42.1-py3-none-any.whl",
          ["filelock", "requests", "Pillow", "importlib_metadata", "accelerate>=0.31; extra == 'torch'"]),
    _item("omegaconf", "2.3.1", "omegaconf-2.3.1-py3-none-any.whl", ["antlr4-python3-runtime==4.9.*", "PyYAML"]),
    _item("antlr4-python3-runtime", "4.9.3", "antlr4-python3-runtime-4.9.3.tar.gz"),  # published as source only
    _item("requests", "2.34.2", "requests-2.34.2-py3-none-any.whl", ["charset_normalizer<4,>=2"]),
    _item("charset-normalizer", "3.5.3", "charset_normalizer-3.5.3-cp312-cp312-manylinux_2_28_x86_64.whl"),
    _item("importlib-metadata", "10.2.0", "importlib_metadata-10.2.0-py3-none-any.whl",
          ["zipp>=3.20", "typing-extensions>=3.6.4; python_version < '3.8'"]),
    _item("zipp", "4.1.2", "zipp-4.1.2-py3-none-any.whl"),
    _item("pillow", "13.0.0", "pillow-13.0.0-cp312-cp312-manylinux_2_28_x86_64.whl"),
    _item("filelock", "4.3.2", "filelock-4.3.2-py3-none-any.whl"),
    _item("typing-extensions", "4.16.0", "typing_extensions-4.16.0-py3-none-any.whl"),
    _item("PyYAML", "6.0.4", "pyyaml-6.0.4-cp312-cp312-manylinux2014_x86_64.whl"),
    _item("packaging", "26.4", "packaging-26.4-py3-none-any.whl"),
]}


def test_the_image_s_packages_and_all_they_require_stay_out_the_rest_is_carried():
    rows = offline_wheels.carried(REPORT, "unizoo", ["torch", "lightning"], PYTHON_312)
    assert [(r["name"], r["version"], r["pure"]) for r in rows] == [
        ("antlr4-python3-runtime", "4.9.3", True),  # a source archive: built here into a none-any wheel
        ("charset-normalizer", "3.5.3", False),  # compiled: downloaded for the target's Python
        ("diffusers", "0.42.1", True),
        ("importlib-metadata", "10.2.0", True),
        ("omegaconf", "2.3.1", True),
        ("pillow", "13.0.0", False),
        ("requests", "2.34.2", True),
        ("zipp", "4.1.2", True)]
    # filelock and PyYAML are needed by diffusers and omegaconf too, but the image has them through torch and lightning;
    # extras not asked for (pytest, accelerate) and requirements whose marker is false here (typing-extensions) are not followed.


def test_an_image_with_more_packages_carries_less():
    rows = offline_wheels.carried(REPORT, "unizoo", ["torch", "lightning", "diffusers"], PYTHON_312)
    assert [r["name"] for r in rows] == ["antlr4-python3-runtime", "omegaconf"]


def test_a_marker_is_evaluated_for_the_python_that_resolves():
    old_python = {**PYTHON_312, "python_version": "3.7", "python_full_version": "3.7.9"}
    assert "typing-extensions" in offline_wheels.closure(REPORT, ["importlib-metadata"], old_python)
    assert "typing-extensions" not in offline_wheels.closure(REPORT, ["importlib-metadata"], PYTHON_312)


def test_a_python_version_that_is_not_major_minor_is_refused_before_pip_runs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        offline_wheels.main(["--python-version", "3"])
    assert exit_info.value.code == 2
    assert "--python-version 3: expected MAJOR.MINOR, e.g. 3.12" in capsys.readouterr().err


def test_the_wheels_folder_is_ignored_by_git():
    # The wheels are built for one machine's Python and image: never committed with the code.
    assert ".offline-wheels/" in (ROOT / ".gitignore").read_text().splitlines()


def test_pure_wheels_are_built_here_compiled_ones_fetched_for_the_target_and_the_build_s_own_carried(monkeypatch, tmp_path):
    commands = []
    monkeypatch.setattr(offline_wheels.subprocess, "run", lambda command, check: commands.append(command))
    rows = offline_wheels.carried(REPORT, "unizoo", ["torch", "lightning", "pillow"], PYTHON_312)
    # pip builds unizoo in an isolated environment from the wheels folder alone: setuptools must be in it.
    offline_wheels.fetch(rows, tmp_path, "3.12", offline_wheels.build_requirements(ROOT))
    built, downloaded = commands
    assert built[built.index("--wheel-dir") + 2:] == [
        "setuptools>=68", "antlr4-python3-runtime==4.9.3", "diffusers==0.42.1", "importlib-metadata==10.2.0",
        "omegaconf==2.3.1", "requests==2.34.2", "zipp==4.1.2"]
    assert "--no-deps" in built and "--only-binary=:all:" in downloaded and downloaded[-1] == "charset-normalizer==3.5.3"
    assert downloaded[downloaded.index("--python-version") + 1] == "3.12" and "manylinux2014_x86_64" in downloaded

