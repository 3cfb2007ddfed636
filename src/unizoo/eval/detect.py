"""Parse a shapes image into objects: per-pixel colour classes, connected components, shape by geometry.

Designed for *generated* images as much as for clean ones: colour is decided by hue (so a dim,
blurred or slightly off-palette pixel still gets its colour), and shape by matching ideal shape
templates placed by the blob's area and centroid, which ragged edges and blur barely move.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from unizoo.data.scene import COLOURS, SHAPES

_COLOUR_NAMES = tuple(COLOURS)
# Palette in "chroma" coordinates: (rgb - min) / (max - min). This drops brightness and
# saturation and keeps only hue, e.g. red -> (1, 0, 0), yellow -> (1, 1, 0).
_PAL = np.array([COLOURS[c] for c in _COLOUR_NAMES], dtype=np.float32)
_PAL_CHROMA = (_PAL - _PAL.min(1, keepdims=True)) / np.ptp(_PAL, axis=1, keepdims=True)

# Foreground: bright enough and saturated enough. Palette colours have max 230 and saturation
# 0.87; a black background with Gaussian noise (sigma ~13) almost never reaches these, and grey
# or white smudges in generated images are not any palette colour.
MIN_BRIGHTNESS = 100.0
MIN_SATURATION = 0.4
# Components smaller than this fraction of the image are noise: half the smallest clean object
# (an 8 px triangle at 32 px, 36 px), so a generated object may lose half its area and still count,
# while the same-colour clusters of uniform noise (<= 20 px at 32 px, median 13) mostly do not.
MIN_AREA_FRAC = 18 / 1024
# Shape = the ideal template (same area, same centroid) with the highest IoU with the blob.
# Measured IoU margins (own template minus best other) on clean renders: >= 0.06 at 32 px
# (small squares vs circles), >= 0.15 at 64 px; the bbox fill ratio, by contrast, flips squares
# to circles as soon as one noisy pixel pokes out of a blurred edge and enlarges the bbox.
# Blobs matching no template at least this well (stringy noise clusters) are not objects.
MIN_IOU = 0.5
_TEMPLATED = ("circle", "square", "triangle")  # the templates shape_ious knows
assert set(_TEMPLATED) == set(SHAPES), "shape_ious needs a template for every data-set shape"
# 8-connectivity: rasterised triangle flanks and blotchy generated shapes are often joined only
# diagonally; separate objects in the data are >= 2 px apart, so diagonals never merge them.
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class DetectedObject:
    """One detected object. ``cx, cy``: centroid in [0, 1] (x right, y down); ``area``: fraction of the image."""

    shape: str
    colour: str
    cx: float
    cy: float
    area: float


def to_rgb_array(image) -> np.ndarray:
    """Convert uint8 [H, W, 3] array, PIL image or float tensor [3, H, W] in [-1, 1] to float32 [H, W, 3] in 0..255."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a tensor of shape [3, H, W], got {tuple(image.shape)}")
        x = image.detach().float().cpu().permute(1, 2, 0).numpy()
        return np.clip((x + 1.0) * 127.5, 0.0, 255.0)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an array of shape [H, W, 3], got {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 array, got {image.dtype}; pass floats as a [3, H, W] tensor in [-1, 1]")
        return image.astype(np.float32)
    raise TypeError(f"unsupported image type {type(image).__name__}")


def classify_pixels(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel class for float [H, W, 3] in 0..255: -1 for background, else an index into COLOURS."""
    mx, mn = rgb.max(axis=2), rgb.min(axis=2)
    chroma_range = mx - mn
    fg = (mx >= MIN_BRIGHTNESS) & (chroma_range >= MIN_SATURATION * mx)
    chroma = (rgb - mn[..., None]) / np.maximum(chroma_range, 1e-6)[..., None]
    dist = ((chroma[:, :, None, :] - _PAL_CHROMA[None, None]) ** 2).sum(-1)  # [H, W, n_colours]
    return np.where(fg, dist.argmin(-1), -1)


def shape_ious(mask: np.ndarray) -> dict[str, float]:
    """IoU of a blob mask [h, w] with an ideal circle, square and upward triangle of equal area and centroid."""
    h, w = mask.shape
    pad = int(np.ceil(0.3 * max(h, w))) + 1  # templates may reach past the blob's bbox
    m = np.pad(mask, pad)
    ys, xs = np.nonzero(m)
    area = len(ys)
    mx, my = xs.mean() + 0.5, ys.mean() + 0.5  # pixel centres
    y, x = np.mgrid[0 : m.shape[0], 0 : m.shape[1]] + 0.5
    half = np.sqrt(area) / 2
    tri_h = np.sqrt(2 * area)  # isoceles, base = height, as drawn
    apex = my - 2 * tri_h / 3  # a triangle's centroid is 2/3 of the way down from the apex
    templates = {
        "circle": (x - mx) ** 2 + (y - my) ** 2 <= area / np.pi,
        "square": (np.abs(x - mx) <= half) & (np.abs(y - my) <= half),
        "triangle": (y >= apex) & (y <= apex + tri_h) & (np.abs(x - mx) <= (y - apex) / 2),
    }
    return {name: float((m & t).sum() / (m | t).sum()) for name, t in templates.items()}


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """Best-matching shape name and its IoU for a boolean blob mask [h, w]."""
    ious = shape_ious(mask)
    best = max(ious, key=ious.get)
    return best, ious[best]


def detect_objects(image) -> list[DetectedObject]:
    """Objects in an image (uint8 [H, W, 3], PIL, or float tensor [3, H, W] in [-1, 1]), sorted top-to-bottom."""
    rgb = to_rgb_array(image)
    h, w = rgb.shape[:2]
    classes = classify_pixels(rgb)
    min_area = MIN_AREA_FRAC * h * w
    found: list[DetectedObject] = []
    for c in np.unique(classes):
        if c < 0:
            continue
        labels, n = ndimage.label(classes == c, structure=_EIGHT)
        areas = np.bincount(labels.ravel(), minlength=n + 1)
        for k, box in enumerate(ndimage.find_objects(labels), start=1):
            if areas[k] < min_area:  # cheap test first: noise images have hundreds of tiny components
                continue
            # Pinholes (noise, blotchy generations) are not part of the shape's outline.
            mask = ndimage.binary_fill_holes(labels[box] == k)
            shape, iou = classify_shape(mask)
            if iou < MIN_IOU:
                continue
            ys, xs = np.nonzero(mask)
            # +0.5: pixel centres, so a square's centroid equals its bbox centre exactly.
            cx = (xs.mean() + box[1].start + 0.5) / w
            cy = (ys.mean() + box[0].start + 0.5) / h
            found.append(DetectedObject(shape, _COLOUR_NAMES[c], float(cx), float(cy), float(mask.sum() / (h * w))))
    return sorted(found, key=lambda o: (o.cy, o.cx))
