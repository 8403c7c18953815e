"""``data.input_size: auto``: an input size that follows the images instead of always 224.

A backbone pretrained at 224 px still works at other sizes (global pooling), and blowing 28 px digits up to 224
costs 64x the compute for no information. The rule, measured on the training images (a deterministic sample of
at most :data:`SAMPLE` of them; only file headers are read):

    size = min(native, max(FLOOR, round_up(FACTOR * median short side, MULTIPLE)))

``native`` is the backbone's own size (``model.backbone.input_size``, 224 for ImageNet models), ``FLOOR`` keeps
enough resolution for five stride-2 stages, ``MULTIPLE`` keeps the feature maps whole. MNIST's 28 px -> 64 (what
``experiment=mnist_effnet`` was tuned with), 8 px digits -> 32, 47 px LFW faces -> 96, photos -> 224.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

SAMPLE = 256
FACTOR = 2.0
FLOOR = 32
MULTIPLE = 32


def short_sides(images: Any, limit: int = SAMPLE) -> list[int]:
    """The short side of up to ``limit`` images, evenly spaced over the split (paths, arrays or image objects)."""
    n = len(images)
    if n == 0:
        return []
    if isinstance(images, np.ndarray) and images.dtype != object and images.ndim >= 3:
        return [int(min(images.shape[1], images.shape[2]))]  # one array: every image has this size
    picks = np.unique(np.linspace(0, n - 1, num=min(n, limit)).round().astype(int))
    return [_short_side(images[int(i)]) for i in picks]


def _short_side(item: Any) -> int:
    if isinstance(item, str):
        from PIL import Image

        with Image.open(item) as image:  # the header only: no pixels are decoded
            return int(min(image.size))
    if hasattr(item, "size") and isinstance(item.size, tuple):  # a PIL image
        return int(min(item.size))
    array = np.asarray(item)
    return int(min(array.shape[0], array.shape[1]))


def auto_input_size(images: Any, native: int) -> int:
    """The input size for ``images`` given the backbone's ``native`` size (module docstring)."""
    sides = short_sides(images)
    if not sides:
        return native
    median = float(np.median(sides))
    wanted = MULTIPLE * math.ceil(FACTOR * median / MULTIPLE)
    return int(min(native, max(FLOOR, wanted)))
