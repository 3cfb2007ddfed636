"""Image files of any size and mode -> square RGB tensors in [-1, 1], and the cheap check of a file's header."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from unizoo.data.skips import EMPTY_FILE, MISSING_FILE, NOT_AN_IMAGE, UNDECODABLE

# What decoding a damaged file raises in PIL: OSError ("image file is truncated", broken
# data stream), ValueError/SyntaxError from some plugins' parsers, and the bomb check.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def header_problem(path: Path) -> str | None:
    """Why `path` cannot be an image, judged from its header only (no decoding), or None.

    Cheap enough to run on every file when a data set is set up: it reads a few bytes.
    A truncated file passes (its header is intact); decoding finds it later.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return MISSING_FILE
    except OSError:
        return UNDECODABLE
    if size == 0:
        return EMPTY_FILE
    try:
        with Image.open(path):
            pass
    except UnidentifiedImageError:
        return NOT_AN_IMAGE
    except DECODE_ERRORS:
        return UNDECODABLE
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode as RGB; transparent pixels (RGBA, LA, palette with transparency) composited on white.

    A bare `convert("RGB")` drops alpha, so fully transparent pixels would show whatever
    colour they happen to store (often black): white is what a viewer shows.
    """
    image = ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        background.alpha_composite(image.convert("RGBA"))
        return background.convert("RGB")
    return image.convert("RGB")


def square_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """`[3, size, size]` float in [-1, 1]: shorter side resized to `size`, then centre-cropped."""
    fitted = ImageOps.fit(to_rgb(image), (size, size), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))
    pixels = np.asarray(fitted, dtype=np.float32)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).div_(127.5).sub_(1.0)


def load_square(source: Path | bytes, size: int) -> torch.Tensor:
    """Decode a file (or its bytes) fully and make it `square_tensor`; raises one of DECODE_ERRORS if it is damaged."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image.load()  # decode now, inside the caller's error handling
        return square_tensor(image, size)
