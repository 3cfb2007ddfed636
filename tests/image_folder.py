"""Writes real image folders for tests: drawn shapes with captions, in the Hugging Face ImageFolder layout, plus bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from unizoo.data.shapes import draw_scene, sample_scene

# (mode, format, size): every mode data=folder must read, at sizes that are not the training size.
VARIANTS = [
    ("RGB", "JPEG", (48, 40)),
    ("RGB", "PNG", (32, 32)),
    ("L", "PNG", (40, 56)),
    ("RGBA", "PNG", (64, 64)),
    ("P", "PNG", (36, 36)),
    ("L", "JPEG", (33, 47)),
]

# The bad samples `write_image_folder(..., bad=True)` adds, by the reason they are skipped for.
BAD = {
    "undecodable_image": 1,  # a truncated JPEG: its header is intact
    "empty_file": 1,  # a zero-byte .png
    "not_an_image": 1,  # a text file named .jpg
    "missing_file": 1,  # a line naming a file that does not exist
    "no_caption": 1,  # a line without "text"
    "invalid_json": 1,  # a line that is not JSON
}


def write_image_folder(root: Path, count: int, bad: bool = True, seed: int = 0) -> list[dict]:
    """`count` good images (drawn scenes, captioned) in two subfolders, then the BAD ones; returns the good lines."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(count):
        mode, fmt, size = VARIANTS[i % len(VARIANTS)]
        scene = sample_scene(rng, 32)
        image = draw_scene(scene, 32).resize(size, Image.NEAREST)
        if mode == "RGBA":
            image = image.convert("RGBA")
            image.putalpha(Image.new("L", size, 255))
        elif mode == "P":
            image = image.convert("P", palette=Image.ADAPTIVE, colors=8)
        else:
            image = image.convert(mode)
        name = f"{'a' if i % 2 else 'b/c'}/{i:04d}.{'jpg' if fmt == 'JPEG' else 'png'}"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / name, fmt)
        lines.append({"file_name": name, "text": scene.caption})
    records = [json.dumps(line) for line in lines]
    if bad:
        truncated = root / "bad" / "truncated.jpg"
        truncated.parent.mkdir(parents=True, exist_ok=True)
        # Noise makes the entropy-coded data most of the file, so cutting it in half keeps the header whole:
        # the file opens, and only decoding it fails.
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(truncated, "JPEG", quality=95)
        truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
        (root / "bad" / "empty.png").write_bytes(b"")
        (root / "bad" / "text.jpg").write_text("not an image\n")
        records += [
            json.dumps({"file_name": "bad/truncated.jpg", "text": "a red circle"}),
            json.dumps({"file_name": "bad/empty.png", "text": "a red circle"}),
            json.dumps({"file_name": "bad/text.jpg", "text": "a red circle"}),
            json.dumps({"file_name": "bad/missing.png", "text": "a red circle"}),
            json.dumps({"file_name": lines[0]["file_name"]}),
            '{"file_name": "a/0001.png", "text": ',
        ]
    (root / "metadata.jsonl").write_text("\n".join(records) + "\n")
    return lines


def shapes_free(overrides: list[str]) -> list[str]:
    """Tiny overrides without the shapes data's own keys (split sizes), for data read from files."""
    return [o for o in overrides if not o.startswith("data.") or o.startswith("data.batch_size")]


def file_data_overrides(choice: str, root: Path, count: int = 24) -> list[str]:
    """Writes data that recipe `data=<choice>` reads from disk under `root`; returns the overrides pointing at it."""
    write_image_folder(root / "folder", count)
    if choice == "folder":
        return ["data=folder", f"data.path={root / 'folder'}", "data.val_fraction=0.25"]
    if choice == "webdataset":
        from unizoo.data.shard_writer import write_shards

        patterns = write_shards(root / "folder", root / "shards", samples_per_shard=8, val_fraction=0.25)
        return ["data=webdataset", f"data.urls={patterns['train']}", f"data.val_urls={patterns['val']}"]
    raise ValueError(f"no test data for data={choice}")
