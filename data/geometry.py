"""Per-sample geometry shared by every backend: where to crop, how big to resize, whether to flip.

Backends differ only in who decodes and resamples the pixels; the *decisions* are made here, in plain
Python, from (seed, epoch, dataset index) and the image size. That is what makes the torchvision and
DALI backends semantically identical and lets a run restart at any step and see the same augmentation.
"""

from __future__ import annotations

import math
import random
from typing import NamedTuple

SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)


class Crop(NamedTuple):
    """A crop window in source pixels (x, y = left, top) plus the horizontal flip decision."""

    x: int
    y: int
    w: int
    h: int
    flip: bool


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """A generator owned by one sample of one epoch: independent of workers, ranks and batch order."""
    return random.Random(f"lip-data:{seed}:{epoch}:{index}")


def random_resized_crop(rng: random.Random, width: int, height: int) -> Crop:
    """torchvision's RandomResizedCrop.get_params (scale (0.08, 1), ratio (3/4, 4/3)) plus a flip coin.

    Same algorithm (10 tries of area/log-ratio sampling, then a clamped central crop), driven by `rng`
    instead of torch's global generator.
    """
    area = width * height
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    for _ in range(10):
        target_area = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y = rng.randint(0, height - h)
            x = rng.randint(0, width - w)
            return Crop(x, y, w, h, rng.random() < 0.5)
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif in_ratio > RATIO[1]:
        w, h = int(round(height * RATIO[1])), height
    else:
        w, h = width, height
    return Crop((width - w) // 2, (height - h) // 2, w, h, rng.random() < 0.5)


def train_crop(seed: int, epoch: int, index: int, width: int, height: int) -> Crop:
    """The train augmentation decision for dataset item `index` in `epoch`."""
    return random_resized_crop(sample_rng(seed, epoch, index), width, height)


def val_resize_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(width, height) after torchvision's Resize(shorter): the long side is truncated, not rounded."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def center_crop_origin(width: int, height: int, size: int) -> tuple[int, int]:
    """(left, top) of torchvision's CenterCrop(size) on a width x height image (Python's round)."""
    return int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
