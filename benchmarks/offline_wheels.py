"""`python -m benchmarks.offline_wheels [DIR] [--python-version X.Y] [--image-has NAME ...]`: the wheels a GPU
machine without network needs to install unizoo, built on a machine with network.

A cluster's compute node, or a GPU machine lent for the GPU check, often reaches no package index and
comes with an image that has the PyTorch stack built for its CUDA (torch, torchvision, Lightning,
transformers, ...) but not the rest of unizoo's requirements. Installing the PyTorch stack again from
here would replace its CUDA build, so this carries only what the image lacks:

1. resolves unizoo's requirements here (`pip install --dry-run --ignore-installed --report`), and
   follows each package's own requirements (their markers evaluated on this Python) through the report;
2. leaves out everything the image's packages (`--image-has`, the PyTorch stack and scientific Python by
   default) require, themselves included;
3. writes the rest to DIR: a pure-Python package as a wheel built here (`pip wheel --no-deps`: a wheel
   any Python 3 installs, also for a package published as source only, such as
   antlr4-python3-runtime); a compiled one as the wheel published for the target's Python
   (`--python-version`, default this one's) on x86-64 Linux (`pip download --only-binary`);
   and what building unizoo itself needs (pyproject's `build-system.requires`, setuptools), so
   that pip builds it in its own isolated environment there too, where a Python 3.12 venv has
   no setuptools of its own.

Then, on the GPU machine, from the clone with DIR in it:

    pip install --no-index --find-links DIR -e .

pip keeps every requirement the image already satisfies and installs the rest from DIR; a requirement
neither has is named (`No matching distribution found for NAME`): run this again with NAME left out of
`--image-has`. DIR (default `.offline-wheels`) is ignored by git.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterable
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]

# What a GPU machine's image has: the PyTorch stack built for its CUDA, and scientific Python.
IMAGE_HAS = ("torch", "torchvision", "lightning", "torchmetrics", "timm", "transformers", "matplotlib", "scipy")

# The platforms a compiled wheel may be published for (x86-64 Linux, glibc 2.17 or later).
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def resolve(root: Path) -> dict:
    """pip's installation report for `root` and every requirement, resolved as on an empty environment."""
    with tempfile.TemporaryDirectory(prefix="unizoo-offline-") as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--report", str(report), str(root)], check=True)
        return json.loads(report.read_text())


def _requires(item: dict, environment: dict) -> list[str]:
    """The names `item` of pip's report requires on `environment` (its extras not asked for)."""
    names = []
    for line in item["metadata"].get("requires_dist") or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({**environment, "extra": ""}):
            names.append(canonicalize_name(requirement.name))
    return names


def closure(report: dict, roots: Iterable[str], environment: dict | None = None) -> set[str]:
    """`roots` and everything they require, transitively, among the packages of pip's report."""
    environment = default_environment() if environment is None else environment
    items = {canonicalize_name(item["metadata"]["name"]): item for item in report["install"]}
    seen: set[str] = set()
    pending = [canonicalize_name(name) for name in roots]
    while pending:
        name = pending.pop()
        if name in seen or name not in items:
            continue
        seen.add(name)
        pending.extend(_requires(items[name], environment))
    return seen


def carried(report: dict, project: str, image_has: Iterable[str], environment: dict | None = None) -> list[dict]:
    """The packages of pip's report that `project` needs and the image lacks: name, version, and whether pure Python.

    A package is pure Python where the file pip chose is a `none-any` wheel or a source archive (built here into a
    `none-any` wheel: a compiled package ships wheels for the platforms it supports, and where it ships none, the
    target has no compiler setup to count on either).
    """
    project = canonicalize_name(project)
    needed = closure(report, [project], environment) - {project}
    present = closure(report, image_has, environment)
    rows = []
    for item in report["install"]:
        name = canonicalize_name(item["metadata"]["name"])
        if name in needed and name not in present:
            file = item["download_info"]["url"].rsplit("/", 1)[-1]
            pure = file.endswith("-none-any.whl") or not file.endswith(".whl")
            rows.append({"name": name, "version": item["metadata"]["version"], "pure": pure, "file": file})
    return sorted(rows, key=lambda row: row["name"])


def build_requirements(root: Path) -> list[str]:
    """What building `root` needs (pyproject's `build-system.requires`)."""
    return tomllib.loads((root / "pyproject.toml").read_text())["build-system"]["requires"]


def fetch(rows: list[dict], out: Path, python_version: str, build: list[str] = ()) -> None:
    """Write each carried package's wheel to `out`: built here where pure Python, downloaded for the target where
    compiled; `build`, requirements of the build itself (pure Python: setuptools), as the newest wheels that meet them."""
    pure = [*build, *(f"{row['name']}=={row['version']}" for row in rows if row["pure"])]
    compiled = [f"{row['name']}=={row['version']}" for row in rows if not row["pure"]]
    if pure:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), *pure], check=True)
    if compiled:
        platforms = [argument for platform in PLATFORMS for argument in ("--platform", platform)]
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--implementation", "cp", "--python-version", python_version, *platforms,
                        "--dest", str(out), *compiled], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.offline_wheels", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path, default=ROOT / ".offline-wheels", help="where the wheels go")
    parser.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                        help="the GPU machine's Python, for the compiled wheels (default: this one's)")
    parser.add_argument("--image-has", nargs="*", default=list(IMAGE_HAS), metavar="NAME",
                        help=f"packages the GPU machine has, with all they require (default: {' '.join(IMAGE_HAS)})")
    args = parser.parse_args(argv)
    if not args.python_version.replace(".", "").isdigit() or args.python_version.count(".") != 1:
        parser.error(f"--python-version {args.python_version}: expected MAJOR.MINOR, e.g. 3.12")

    print("offline_wheels: resolving unizoo's requirements (pip, about half a minute) ...", file=sys.stderr)
    report = resolve(ROOT)
    unknown = sorted(set(map(canonicalize_name, args.image_has)) - {canonicalize_name(i["metadata"]["name"]) for i in report["install"]})
    if unknown:
        parser.error(f"--image-has {' '.join(unknown)}: not among unizoo's requirements or theirs, so it changes nothing")
    rows = carried(report, "unizoo", args.image_has)
    args.out.mkdir(parents=True, exist_ok=True)
    build = build_requirements(ROOT)
    fetch(rows, args.out, args.python_version, build)
    wheels = sorted(args.out.glob("*.whl"))
    size = sum(wheel.stat().st_size for wheel in wheels)
    print(f"offline_wheels: {len(rows)} packages the image ({' '.join(args.image_has)}) lacks, "
          f"{len(wheels)} wheels in {args.out} ({size / 2**20:.1f} MiB):")
    for row in rows:
        print(f"  {row['name']} {row['version']} ({'pure Python' if row['pure'] else f'compiled, for Python {args.python_version}'})")
    print(f"  and, to build unizoo there: {', '.join(build)}")
    print(f"on the GPU machine, in the clone: pip install --no-index --find-links {args.out} -e .")
    return 0


if __name__ == "__main__":
    sys.exit(main())
