"""The package's layout holds: imports run one way between its packages, no module imports itself
through a loop, and the top level stays a few modules (docs/design.md, "The package map")."""

from __future__ import annotations

import ast
import fnmatch
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Where each part of the `unizoo` import path lives in the repository (pyproject.toml's package-dir).
SOURCES = {"unizoo": ROOT / "src" / "unizoo", "unizoo.components": ROOT / "components"}

# Lowest first. A module may import its own package and every package of a lower layer, nothing higher.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "images"),
    ("runtime", "text"),
    ("config",),
    ("pretraining",),
    ("data",),
    ("components",),
    ("model",),
    ("eval",),
    ("training",),
    ("studies",),
    ("environment",),
    ("cli",),
]
LAYER_OF = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}
MAX_TOP_LEVEL_FILES = 8


def modules() -> dict[str, Path]:
    """Every module of the installed package, by its import name."""
    found = {}
    for prefix, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [*prefix.split("."), *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, at module level or inside functions, except under `if TYPE_CHECKING:`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from (n for child in node.orelse for n in _import_nodes(ast.Module(body=[child], type_ignores=[])))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _import_nodes(node)


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The unizoo modules that module `name` imports (a `from package import module` counts as the module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            bases = [(alias.name, []) for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            bases = [(base, [alias.name for alias in node.names])]
        for base, names in bases:
            if not base.startswith("unizoo"):
                continue
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
            targets.update(submodules or [_nearest_module(base, known)])
    targets.discard(name)
    return targets


def _nearest_module(dotted: str, known: dict[str, Path]) -> str:
    while dotted not in known and "." in dotted:
        dotted = dotted.rpartition(".")[0]
    return dotted


def part_of(name: str) -> str | None:
    """The package (or top-level module) of `unizoo` that module `name` belongs to; None for `unizoo` itself."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_every_part_of_the_package_has_a_layer():
    parts = {part_of(name) for name in modules()} - {None}
    assert parts <= set(LAYER_OF), f"packages without a layer in LAYERS (and in docs/design.md): {sorted(parts - set(LAYER_OF))}"


def test_imports_run_one_way_between_packages():
    wrong = []
    for name, targets in graph().items():
        mine = part_of(name)
        if mine is None:  # unizoo/__init__.py: only the names of moved modules, imported on request
            continue
        for target in sorted(targets):
            theirs = part_of(target)
            if theirs is not None and theirs != mine and LAYER_OF[theirs] >= LAYER_OF[mine]:
                allowed = sorted(p for p, rank in LAYER_OF.items() if rank < LAYER_OF[mine])
                wrong.append(f"{name} imports {target}: {mine} may import only {', '.join(allowed) or 'nothing'}")
    assert not wrong, "\n".join(wrong)


def test_nothing_below_the_run_loop_imports_it():
    # The rule the layers exist for, spelled out: the zoo and the data never reach into a run.
    for name, targets in graph().items():
        if part_of(name) in ("components", "data", "pretraining", "config", "runtime", "model", "eval"):
            assert not {t for t in targets if part_of(t) in ("training", "studies", "cli")}, name


def test_no_module_imports_itself_through_a_loop():
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    loops = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert not loops, f"modules that import each other: {loops}"


def test_the_top_level_holds_a_few_modules():
    top = sorted(path.name for path in SOURCES["unizoo"].glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_FILES, top


def test_the_checker_sees_a_wrong_import(tmp_path):
    # The rules above are only as good as the import reader: it must catch a lazy import inside a function.
    module = tmp_path / "shapes.py"
    module.write_text("def f():\n    from unizoo.training.train import train\n    return train\n")
    known = {**modules(), "unizoo.data.fake": module}
    assert imports_of("unizoo.data.fake", module, known) == {"unizoo.training.train"}


def test_a_moved_module_keeps_its_old_path_with_a_warning():
    # A user's recipe may still say `_target_: unizoo.sharding.FullyShardedStrategy`, or a script
    # `from unizoo.train import train`: both resolve to the module's new home, and say where it is.
    script = (
        "import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
        "from hydra.utils import get_class\n"
        "try:\n"
        "    get_class('unizoo.sharding.FullyShardedStrategy')\n"
        "except Exception as error:\n"
        "    print(error)\n"
        "warnings.simplefilter('ignore', DeprecationWarning)\n"
        "from unizoo.train import train\n"
        "import unizoo.sharding, unizoo.training.sharding\n"
        "print(train.__module__, unizoo.sharding is unizoo.training.sharding, unizoo.sharding.__spec__.name)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "unizoo.sharding moved to unizoo.training.sharding" in lines[0]
    assert lines[-1] == "unizoo.training.train True unizoo.training.sharding"


def test_every_moved_module_names_a_module_that_exists():
    import unizoo

    known = modules()
    assert {new for new in unizoo.MOVED_MODULES.values() if new not in known} == set()
    assert {old for old in unizoo.MOVED_MODULES if old in known} == set()


def test_a_wheel_carries_every_package_and_every_recipe():
    # A wheel (`pip install .`, or one built for a cluster) holds only the packages pyproject.toml lists
    # and the recipe files its globs match; an editable install finds any folder, so a package left out
    # of the list passes every test in a checkout and fails on import where the wheel is installed.
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {name: ROOT / folder for name, folder in setuptools["package-dir"].items()}
    found = {
        ".".join([name, *init.parent.relative_to(folder).parts])
        for name, folder in folders.items() for init in folder.rglob("__init__.py")
    }
    assert found - set(setuptools["packages"]) == set()
    globs = setuptools["package-data"]["unizoo.recipes"]
    recipes = [path.relative_to(folders["unizoo.recipes"]) for path in folders["unizoo.recipes"].rglob("*.yaml")]
    assert len(recipes) > 40
    unmatched = [str(path) for path in recipes if not any(
        len(path.parts) == len(glob.split("/")) and all(map(fnmatch.fnmatch, path.parts, glob.split("/")))
        for glob in globs)]
    assert unmatched == []
