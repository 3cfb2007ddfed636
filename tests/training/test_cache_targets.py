"""`unizoo cache-targets` and `unizoo train targets=DIR`: training from pre-extracted targets.

The acceptance check: the same recipe trained from the cache and with on-the-fly encoding
logs the same losses (to 1e-5), for VAE latents and CLIP features. Other tests show the
cache is really what training reads, that items and targets stay matched under
shuffling, and that a cache made for another recipe is refused.
"""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file, save_file

from conftest import STAGE_STEPS, TINY_OVERRIDES
from unizoo.cli import main
from unizoo.config.composition import compose_recipe
from unizoo.data.target_shards import TargetShards, TargetsMismatch, write_shards
from unizoo.data.with_targets import TargetsDataset, attach_cached_targets
from unizoo.training.build import build_model
from unizoo.training.cache_targets import cache_targets, encoded_batches
from unizoo.training.train import train

REPRESENTATIONS = {"vae": [], "clip": ["representation=clip"]}


def _overrides(tmp_path: Path, representation: str = "vae") -> list[str]:
    return [*TINY_OVERRIDES, *STAGE_STEPS["generation"], *REPRESENTATIONS[representation], f"run_root={tmp_path / 'runs'}"]


def _losses(run_dir: Path, stage: str = "generation") -> dict[int, float]:
    """Training loss per step from the run's metrics.csv."""
    with open(run_dir / "logs" / stage / "metrics.csv") as file:
        return {int(row["step"]): float(row["train/generation"]) for row in csv.DictReader(file) if row["train/generation"]}


@pytest.fixture(scope="module")
def vae_cache(tmp_path_factory) -> tuple[Path, list[str]]:
    """A VAE target cache of the tiny default recipe, in 3 shards (100 + 100 + 56 items)."""
    tmp = tmp_path_factory.mktemp("vae_cache")
    overrides = _overrides(tmp)
    directory = cache_targets(compose_recipe("default", [*overrides, f"targets={tmp / 'targets'}"]), items_per_shard=100, progress=False)
    return directory, overrides


@pytest.mark.parametrize("representation", ["vae", "clip"])
def test_training_from_the_cache_gives_the_same_losses(representation, tmp_path):
    overrides = _overrides(tmp_path, representation)
    targets = tmp_path / "targets"
    assert main(["cache-targets", f"targets={targets}", *overrides]) == 0
    on_the_fly = train(compose_recipe("default", overrides))
    from_cache = train(compose_recipe("default", [*overrides, f"targets={targets}"]))
    expected, got = _losses(on_the_fly), _losses(from_cache)
    assert list(expected) == list(got) == [0, 1, 2, 3]  # every step logged
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, abs=1e-5), (step, got[step], loss)
    # The targets really came from the cache: other targets in it give other losses.
    shard = targets / "targets-00000.safetensors"
    tensors = load_file(shard)
    save_file({**tensors, "targets": tensors["targets"] + 1.0}, str(shard))
    shifted = _losses(train(compose_recipe("default", [*overrides, f"targets={targets}"])))
    assert all(abs(shifted[step] - loss) > 1e-3 for step, loss in expected.items()), (shifted, expected)


def test_cache_holds_what_encode_returns_for_every_item(vae_cache):
    directory, overrides = vae_cache
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["items"] == 256 and manifest["shape"] == [64, 4] and manifest["dtype"] == "float32"
    assert [s["items"] for s in manifest["shards"]] == [100, 100, 56]
    assert manifest["bytes"] == sum((directory / s["file"]).stat().st_size for s in manifest["shards"])
    recipe = compose_recipe("default", overrides)
    datamodule = instantiate(recipe.data)
    model = build_model(recipe)
    model.prepare(datamodule)
    shards = TargetShards(directory)
    dataset = datamodule.dataset("train")
    for index in (0, 99, 100, 255):  # both sides of a shard boundary
        expected = model.representation.encode(dataset[index]["image"][None])[0]
        torch.testing.assert_close(shards[index], expected, rtol=0, atol=1e-5)


def test_shuffled_batches_carry_their_own_items_targets(vae_cache):
    directory, overrides = vae_cache
    recipe = compose_recipe("default", [*overrides, f"targets={directory}"])
    datamodule = instantiate(recipe.data)
    attach_cached_targets(datamodule, recipe)
    model = build_model(recipe)
    model.prepare(datamodule)
    loader = datamodule.train_dataloader()
    assert isinstance(loader.dataset, TargetsDataset)
    assert not isinstance(datamodule.dataset("val"), TargetsDataset)  # evaluation reads images only
    batches = iter(loader)
    for _ in range(3):
        batch = next(batches)
        assert set(batch) >= {"image", "caption", "target"} and batch["target"].shape == (8, 64, 4)
        torch.testing.assert_close(batch["target"], model.representation.encode(batch["image"]), rtol=0, atol=1e-5)
    # A resumed loader (batches skipped) still pairs each item with its target.
    loader.sampler.start_after(5, 8)
    batch = next(iter(loader))
    torch.testing.assert_close(batch["target"], model.representation.encode(batch["image"]), rtol=0, atol=1e-5)


def test_generation_loss_reads_the_batch_target(vae_cache):
    _, overrides = vae_cache
    recipe = compose_recipe("default", overrides)
    model = build_model(recipe)
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    batch = {"image": images, "caption": ["a red circle"] * 4}

    def loss(extra):
        torch.manual_seed(0)  # the objective's noise and timesteps
        return model.generation_loss({**batch, **extra})["generation"][0].item()

    assert loss({"target": model.representation.encode(images)}) == pytest.approx(loss({}), abs=1e-6)
    assert abs(loss({"target": torch.zeros(4, 64, 4)}) - loss({})) > 1e-3


def test_a_cache_for_another_recipe_is_refused(vae_cache, tmp_path, capsys):
    directory, overrides = vae_cache
    changed = [*overrides, "vae.pretraining.steps=4", f"targets={directory}"]
    with pytest.raises(TargetsMismatch) as error:
        attach_cached_targets(instantiate(compose_recipe("default", changed).data), compose_recipe("default", changed))
    message = str(error.value)
    cached_hash = json.loads((directory / "manifest.json").read_text())["hash"]
    assert cached_hash in message and "representation.pretraining.steps (cache 3, this run 4)" in message
    # From the command line: exit 2, one paragraph naming both, no run directory, the cache untouched.
    runs = tmp_path / "runs"
    assert main(["train", *overrides, "representation=clip", f"targets={directory}", f"run_root={runs}"]) == 2
    err = capsys.readouterr().err
    assert "unizoo train: the target cache" in err and cached_hash in err and "CLIPRepresentation" in err
    assert "VAERepresentation" in err and "Traceback" not in err
    assert not runs.exists()
    assert main(["cache-targets", *overrides, "data.train_size=128", f"targets={directory}"]) == 2
    assert "data.train_size (cache 256, this run 128)" in capsys.readouterr().err
    assert json.loads((directory / "manifest.json").read_text())["items"] == 256


def test_cache_targets_needs_a_folder_and_keeps_a_matching_cache(vae_cache, tmp_path, capsys, caplog):
    directory, overrides = vae_cache
    assert main(["cache-targets", *overrides]) == 2
    assert "targets=DIR" in capsys.readouterr().err
    before = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
    assert main(["cache-targets", *overrides, f"targets={directory}"]) == 0  # already there: nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["cache-targets", *overrides, f"targets={tmp_path / 'other'}"]) == 2
    assert "is not a target cache" in capsys.readouterr().err
    assert main(["train", *overrides, f"targets={tmp_path / 'missing'}"]) == 2
    assert "no target cache there" in capsys.readouterr().err


def test_items_the_data_set_skips_have_no_target(vae_cache, tmp_path):
    """A data set may give None for an unreadable item (its loader's collate drops it): no target, no gap."""
    _, overrides = vae_cache
    recipe = compose_recipe("default", overrides)
    model = build_model(recipe)
    shapes = instantiate(recipe.data).dataset("train")

    class SkipsThree(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, index):
            return None if index == 3 else shapes[index]

    manifest = write_shards(tmp_path / "cache", {"made": "here"},
                            encoded_batches(model.representation, SkipsThree(), 4, 0, torch.device("cpu"), progress=False),
                            10, items_per_shard=4)
    assert (manifest["items"], manifest["targets"]) == (10, 9) and [s["items"] for s in manifest["shards"]] == [4, 4, 1]
    shards = TargetShards(tmp_path / "cache")
    dataset = TargetsDataset(SkipsThree(), shards)
    assert dataset[3] is None
    for index in (2, 4, 9):  # the items after the skipped one keep their own targets
        torch.testing.assert_close(dataset[index]["target"], model.representation.encode(shapes[index]["image"][None])[0],
                                   rtol=0, atol=1e-5)
    with pytest.raises(KeyError, match="item 3 has no target"):
        shards[3]


def test_cache_targets_works_on_the_device_asked_for_index_included(monkeypatch, tmp_path):
    """`--device cuda:1`: the representation pretrains on cuda:1, not on this process's default GPU (cuda:0)."""
    import unizoo.training.cache_targets as command

    placed = []

    class _Placed(Exception):
        pass

    @contextlib.contextmanager
    def recording(accelerator, precision="32-true"):
        placed.append(accelerator)
        raise _Placed

    monkeypatch.setattr(command, "_device", lambda name: torch.device("cuda", 1))  # a machine with two GPUs
    monkeypatch.setattr(command, "loops_on", recording)
    with pytest.raises(_Placed):
        cache_targets(compose_recipe("default", [*TINY_OVERRIDES, f"targets={tmp_path / 'targets'}"]), device="cuda:1")
    assert placed == ["cuda:1"]


def test_a_device_this_machine_lacks_is_refused_before_any_work(tmp_path, capsys):
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    runs = tmp_path / "targets"
    assert main(["cache-targets", *TINY_OVERRIDES, f"targets={runs}", "--device", f"cuda:{gpus}"]) == 2
    err = capsys.readouterr().err
    assert f"--device cuda:{gpus} but this machine has {gpus} CUDA GPU(s); valid: auto, cpu" in err and "Traceback" not in err
    assert main(["cache-targets", *TINY_OVERRIDES, f"targets={runs}", "--device", "gpu"]) == 2
    assert "--device 'gpu' is not a device; valid: auto, cpu, cuda, cuda:<index>" in capsys.readouterr().err
    assert not runs.exists()
