"""Shared fixtures: the real recipes, composed and shrunk to run in seconds on a CPU.

As in lightning-hydra-template: tests compose the *real* recipe files and only
override sizes, so a recipe that breaks is caught here, not in a user's run.
"""

from __future__ import annotations

import functools
import getpass
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

# Overrides that shrink any recipe to a few seconds; sizes stay valid for every component.
TINY_OVERRIDES = [
    "data.train_size=256",
    "data.val_size=64",
    "data.test_size=64",
    "data.batch_size=8",
    "vae.autoencoder.block_out_channels=[16,16,16]",
    "vae.pretraining.steps=3",
    "clip.pretraining.steps=3",
    "ssl.pretraining.steps=3",
    "decoder.training.steps=3",
    "evaluation.feature_spaces.shapes_classifier.training.steps=3",
    "evaluation.feature_spaces.shapes_classifier.training.train_items=64",
    "evaluation.feature_spaces.shapes_classifier.training.batch_size=16",
    "+decoder.generator.depth=1",
    "+decoder.generator.hidden_size=32",
    "+decoder.generator.num_heads=2",
    "+backbone.config_overrides={hidden_size:32,intermediate_size:64,num_hidden_layers:1,num_attention_heads:2,num_key_value_heads:1}",
    "backbone.num_queries=4",
    "+generator.depth=1",
    "+generator.hidden_size=32",
    "+generator.num_heads=2",
    "warmup_steps=2",
    "evaluation.prompts=4",
    "evaluation.steps=2",
    "trainer.log_every_n_steps=1",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
    "trainer.accelerator=cpu",  # the default trainer takes a GPU where there is one: tests pin the CPU
    # fp32, where the trainer recipes choose bf16 on hardware that computes it natively: a test's
    # numbers must not depend on the CPU it runs on (test_precision covers bf16 and the choice).
    "trainer.precision=32-true",
]

# Stage lengths are named per strategy, so they are set where a test trains.
STAGE_STEPS = {
    "generation": ["strategy.steps=4"],
    "joint": ["strategy.steps=4"],
    "sequential": ["strategy.understanding_steps=4", "strategy.generation_steps=4"],
}


_SESSION_TMP: str | None = None


def pytest_configure(config):
    """Every temporary file of the session, its subprocesses' included, goes under one folder removed at its end.

    Libraries make temporary folders that outlive a session (wandb's media and artifact folders,
    torch elastic's, and more): each session used to leave several empty folders in /tmp.
    TMPDIR reaches the subprocesses too. Two folders stay where they were, in the system's
    temporary folder: pytest's own (its `tmp_path` folders, the last three sessions' kept for
    inspecting a failure) and inductor's compile cache, so a second session compiles no more.
    """
    global _SESSION_TMP
    system_tmp = tempfile.gettempdir()
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", system_tmp)  # read when pytest first makes its base folder, later
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (some containers): torch's default_cache_dir says uid_N too
        user = f"uid_{os.getuid()}"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(system_tmp, f"torchinductor_{user}"))
    _SESSION_TMP = tempfile.mkdtemp(prefix="unizoo-tests-")
    os.environ["TMPDIR"] = _SESSION_TMP
    tempfile.tempdir = _SESSION_TMP


def pytest_unconfigure(config):
    if _SESSION_TMP is not None:
        shutil.rmtree(_SESSION_TMP, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Every test session trains its tiny VAEs into a cache of its own, never the user's.

    Session-scoped so that it is in place before module-scoped fixtures train.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UNIZOO_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        yield


@pytest.fixture
def tiny_overrides(tmp_path):
    return [*TINY_OVERRIDES, f"run_root={tmp_path / 'runs'}"]


# The representations whose cache keys the tests check; their keys are computed together, once.
CACHE_KEYED_REPRESENTATIONS = ("vae.VAERepresentation", "clip.CLIPRepresentation", "ssl.SSLRepresentation")


@functools.cache
def _cache_keys_per_process() -> tuple[dict[str, str], ...]:
    """Each of `CACHE_KEYED_REPRESENTATIONS`' default cache keys, computed in three processes with
    different string-hash seeds; one process computes all three (its start-up, ~8 s, is most of the cost)."""
    lines = ["import json", "from unizoo.data.datamodule import ShapesDataModule",
             "from unizoo.pretraining.cache import content_hash", "keys = {}"]
    for representation in CACHE_KEYED_REPRESENTATIONS:
        module, cls = representation.rsplit(".", 1)
        lines += [f"from unizoo.components.representations.{module} import {cls}",
                  f"keys[{representation!r}] = content_hash({cls}().cache_signature(ShapesDataModule()))"]
    lines.append("print(json.dumps(keys))")
    # The three start together: their start-up is mostly imports, which overlap on two cores.
    processes = [subprocess.Popen([sys.executable, "-c", "\n".join(lines)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env={**os.environ, "PYTHONHASHSEED": str(seed)})
                 for seed in (1, 2, 3)]
    keys = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
        keys.append(json.loads(stdout.strip().splitlines()[-1]))
    return tuple(keys)


def cache_keys_in_fresh_processes(representation: str) -> set[str]:
    """The cache key of `representation`'s default (a class name in unizoo.components.representations,
    one of `CACHE_KEYED_REPRESENTATIONS`) computed in three processes with different string-hash seeds.

    Python randomises str hashing per process; a key built from set-ordered config
    (such as transformers' or diffusers' private bookkeeping) would miss the cache in
    every new run.
    """
    return {keys[representation] for keys in _cache_keys_per_process()}
