"""data=folder: a Hugging Face ImageFolder layout read from real files, bad ones skipped and counted."""

from __future__ import annotations

import json
import random

import pytest
import torch
from PIL import Image

from conftest import TINY_OVERRIDES
from image_folder import BAD, write_image_folder
from unizoo.cli import main
from unizoo.config.composition import compose_recipe
from unizoo.data.folder import ImageFolderDataModule
from unizoo.data.image_files import header_problem, square_tensor, to_rgb
from unizoo.data.skips import DataError
from unizoo.training.build import build_model

GOOD = 40


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return root, write_image_folder(root, GOOD)


def _keys(dataset) -> list[str]:
    return [dataset[i]["key"] for i in range(len(dataset))]


# The split is a hash of (seed, file name): seed 0 puts the truncated file in val, seed 1 in train.
@pytest.mark.parametrize(("seed", "split"), [(0, "val"), (1, "train")])
def test_every_good_image_is_served_and_every_bad_one_is_counted(folder, seed, split):
    root, lines = folder
    assert header_problem(root / "bad" / "truncated.jpg") is None  # only decoding can find this one
    data = ImageFolderDataModule(path=str(root), image_size=32, batch_size=4, val_fraction=0.25, seed=seed)
    data.setup()
    listed = [e.key for name in ("train", "val") for e in data.dataset(name).entries]
    if split == "val":  # the val split is decoded in full when set up
        assert data.skipped() == BAD and "bad/truncated.jpg" not in listed
    else:  # the train split when read
        assert data.skipped() == {reason: 1 for reason in BAD if reason != "undecodable_image"}
        assert "bad/truncated.jpg" in listed
    served = [*data.val_dataloader(), *torch.utils.data.DataLoader(data.dataset("train"), batch_size=4)]
    keys = [key for batch in served for key in batch["key"]]
    images = torch.cat([batch["image"] for batch in served])
    good = {line["file_name"] for line in lines}
    # A train file that fails to decode is replaced by the next readable image.
    assert set(keys) == good and len(keys) == GOOD + (split == "train") and "bad/truncated.jpg" not in keys
    assert images.shape == (len(keys), 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert data.skipped() == BAD
    captions = {line["file_name"]: line["text"] for line in lines}
    batch = next(iter(data.val_dataloader()))
    assert batch["caption"] == [captions[key] for key in batch["key"]]
    assert data.prompts("val", 4) == batch["caption"]  # the evaluation's prompts are its reference images' captions


def test_split_is_disjoint_deterministic_and_independent_of_line_order(folder, tmp_path):
    root, lines = folder
    data = ImageFolderDataModule(path=str(root), batch_size=4, val_fraction=0.25)
    train, val = set(_keys(data.dataset("train"))), set(_keys(data.dataset("val")))
    assert not train & val and len(train | val) == GOOD and 4 <= len(val) <= 18
    shuffled = [json.dumps(line) for line in lines]
    random.Random(1).shuffle(shuffled)
    for line in lines:
        (tmp_path / line["file_name"]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / line["file_name"]).write_bytes((root / line["file_name"]).read_bytes())
    (tmp_path / "metadata.jsonl").write_text("\n".join(shuffled))
    again = ImageFolderDataModule(path=str(tmp_path), batch_size=4, val_fraction=0.25)
    assert set(again.dataset("val").entries[i].key for i in range(len(again.dataset("val")))) == val
    other_seed = ImageFolderDataModule(path=str(root), batch_size=4, val_fraction=0.25, seed=1)
    assert {e.key for e in other_seed.dataset("val").entries} != val


def test_val_path_is_a_second_folder(folder, tmp_path):
    root, _ = folder
    val_lines = write_image_folder(tmp_path, 5, bad=False, seed=3)
    data = ImageFolderDataModule(path=str(root), val_path=str(tmp_path), batch_size=4)
    assert len(data.dataset("train")) == GOOD + 1 and {e.key for e in data.dataset("val").entries} == {
        line["file_name"] for line in val_lines
    }
    assert data.prompts("val", 3) == [line["text"] for line in val_lines[:3]]


def test_modes_become_rgb_with_alpha_on_white_and_sizes_are_centre_cropped():
    clear = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red: a viewer shows white
    assert to_rgb(clear).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0])
    palette.info["transparency"] = 0
    assert to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (4, 4), 100)).getpixel((1, 1)) == (100, 100, 100)
    # 64 x 32: left quarter red, middle half blue, right quarter green; the centre crop is all blue.
    wide = Image.new("RGB", (64, 32), (0, 0, 255))
    wide.paste((255, 0, 0), (0, 0, 16, 32))
    wide.paste((0, 255, 0), (48, 0, 64, 32))
    square = square_tensor(wide, 16)
    assert square.shape == (3, 16, 16)
    inner = square[:, :, 1:-1]  # the edge columns' filter reaches a little past the crop, as resampling should
    assert torch.allclose(inner[2], torch.ones(16, 14), atol=0.02) and inner[:2].max() < -0.98
    assert square[0, :, 0].max() > -0.9  # and the red beside the crop does reach its edge: the crop is centred


def test_decode_failures_found_in_worker_processes_are_counted(folder):
    root, _ = folder
    data = ImageFolderDataModule(path=str(root), batch_size=4, val_fraction=0.25, num_workers=2, seed=1)  # truncated in train
    data.setup()
    for split in ("train", "val"):
        for _ in torch.utils.data.DataLoader(data.dataset(split), batch_size=4, num_workers=2):
            pass
    assert data.skipped()["undecodable_image"] == 1


def test_tokenizer_is_built_from_the_folders_captions(tmp_path):
    lines = write_image_folder(tmp_path, 8, bad=False)
    extra = tmp_path / "a" / "zebra.png"
    Image.new("RGB", (20, 20), (200, 200, 200)).save(extra)
    with (tmp_path / "metadata.jsonl").open("a") as f:
        f.write(json.dumps({"file_name": "a/zebra.png", "text": "A grey Zebra, grazing."}) + "\n")
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("data.")]
    model = build_model(compose_recipe("default", ["data=folder", f"data.path={tmp_path}", *overrides]))
    tokenizer = model.backbone.tokenizer
    vocabulary = set(tokenizer.get_vocab())
    assert {"zebra", "grey", "grazing", ",", "."} <= vocabulary
    assert "hexagon" not in vocabulary and "<unk>" in vocabulary
    words = {word for line in lines for word in line["text"].split()}
    assert words <= vocabulary
    ids = tokenizer("a zebra hexagon", add_special_tokens=False)["input_ids"]
    assert ids[-1] == tokenizer.unk_token_id and ids[1] != tokenizer.unk_token_id


def test_vocabulary_size_keeps_the_most_frequent_words(tmp_path):
    write_image_folder(tmp_path, 12, bad=False)
    words = ImageFolderDataModule(path=str(tmp_path), vocabulary_size=3).vocabulary()
    assert len(words) == 3 and "a" in words


def test_folder_without_metadata_or_readable_images_is_a_clear_error(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    with pytest.raises(DataError, match="metadata.jsonl"):
        ImageFolderDataModule(path=str(tmp_path))
    assert main(["train", "data=folder", f"data.path={tmp_path}", f"run_root={tmp_path / 'runs'}"]) == 2
    message = capsys.readouterr().err
    assert str(tmp_path) in message and "metadata.jsonl" in message and '"file_name"' in message
    assert not (tmp_path / "runs").exists()

    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "nope.png", "text": "a cat"}) + "\n")
    with pytest.raises(DataError, match="no readable image"):
        ImageFolderDataModule(path=str(tmp_path)).setup()
    assert main(["train", "data=folder", f"data.path={tmp_path}", f"run_root={tmp_path / 'runs'}"]) == 2
    assert "no readable image" in capsys.readouterr().err and not (tmp_path / "runs").exists()
    assert main(["train", "data=folder", "data.path=" + str(tmp_path / "absent")]) == 2
    assert "is not a directory" in capsys.readouterr().err
