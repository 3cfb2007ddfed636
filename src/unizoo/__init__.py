"""unizoo: a zoo of interchangeable components for unified multimodal models.

The package, one folder per kind of thing (docs/design.md has the map and the import
directions a test holds it to):

    cli.py        the command line            model.py     the LightningModule that wires a recipe
    errors.py     a user's mistakes, exit 2   images.py    PNG images and sample grids
    config/       recipes: composition, type checks, local weights
    runtime/      precision, progress lines, LR schedules: what every training loop follows
    text/         tokenizers unizoo builds, and words they cannot read
    pretraining/  the tiny VAE, CLIP and pixel decoder unizoo trains for itself, and their cache
    data/         the shapes data, image folders, WebDataset shards, cached targets
    components/   the zoo (installed from components/): representations, backbones, generators, ...
    eval/         the shapes evaluator and the evaluations a run makes
    training/     the run loop and everything it calls per run, stage or step
    studies/      grids of recipes, one job per variant, and their report
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"

# Modules that stood at the package's top level until the layout grouped them (0.1.0), by
# their old name. Recipes and scripts that name an old path (`_target_:
# unizoo.sharding.FullyShardedStrategy`, `from unizoo.train import train`) keep working,
# with a DeprecationWarning naming the new one.
MOVED_MODULES = {
    "unizoo.build": "unizoo.training.build",
    "unizoo.cache_targets": "unizoo.training.cache_targets",
    "unizoo.checkpoints": "unizoo.training.checkpoints",
    "unizoo.composition": "unizoo.config.composition",
    "unizoo.ema": "unizoo.training.ema",
    "unizoo.evaluation": "unizoo.eval.evaluation",
    "unizoo.experiment_log": "unizoo.eval.experiment_log",
    "unizoo.faults": "unizoo.training.faults",
    "unizoo.generation_evaluator": "unizoo.eval.generation_evaluator",
    "unizoo.launch": "unizoo.training.launch",
    "unizoo.loss_log": "unizoo.training.loss_log",
    "unizoo.nonfinite": "unizoo.training.nonfinite",
    "unizoo.periodic_evaluation": "unizoo.eval.periodic_evaluation",
    "unizoo.precision": "unizoo.runtime.precision",
    "unizoo.progress": "unizoo.runtime.progress",
    "unizoo.recipe_types": "unizoo.config.recipe_types",
    "unizoo.resume": "unizoo.training.resume",
    "unizoo.run_loggers": "unizoo.training.run_loggers",
    "unizoo.runs": "unizoo.training.runs",
    "unizoo.sample_statistics": "unizoo.eval.sample_statistics",
    "unizoo.schedules": "unizoo.runtime.schedules",
    "unizoo.sharding": "unizoo.training.sharding",
    "unizoo.stage_callbacks": "unizoo.training.stage_callbacks",
    "unizoo.stage_weights": "unizoo.training.stage_weights",
    "unizoo.step_seeds": "unizoo.training.step_seeds",
    "unizoo.study": "unizoo.studies.study",
    "unizoo.throughput": "unizoo.training.throughput",
    "unizoo.train": "unizoo.training.train",
    "unizoo.vocabulary": "unizoo.text.unknown_words",
    "unizoo.weights": "unizoo.config.weights",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path as the module that now holds it (the same module object)."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = MOVED_MODULES[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        # importlib stamps the old name's spec on the module it is handed: keep the real one to put back.
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # The module ran when it was first imported by its new name; only its own spec comes back.
        module.__spec__ = module.__spec__.loader_state


def __getattr__(name: str):
    # `unizoo.<old>` as an attribute, which is how Hydra's `_target_` lookup walks a path.
    old = f"{__name__}.{name}"
    if old in MOVED_MODULES:
        return importlib.import_module(old)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
