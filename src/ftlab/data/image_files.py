"""Reading one image file the way every image reaches a model: upright, 8-bit, frame one, bombs refused.

Files from the wild come as 16-bit PNGs, CMYK JPEGs, palette images with a transparent colour, phone photos that
are stored sideways with an EXIF orientation, animated GIFs, cut-off downloads and decompression bombs. Training,
evaluation and prediction all read through :func:`read_image`, so a file is seen the same way by each of them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ftlab.utils.errors import DataError

# modes PIL reads that hold more than 8 bits per channel: scaled to 0..255 (their full range)
_WIDE = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535}


class ImageReadError(DataError):
    """One image file cannot be read; the message names it and says why (prediction skips it and goes on)."""

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message)
        # what ftlab-eval lists as skipped (optional: a loader worker re-raises the type with the message alone)
        self.path = str(path) if path is not None else None


def _eight_bit(image) -> np.ndarray:  # noqa: ANN001  (a PIL image)
    """The image as a uint8 array (H, W) or (H, W, C): L, RGB or RGBA (alpha is dropped by ``Channels``)."""
    if image.mode in ("L", "RGB", "RGBA"):
        return np.asarray(image)
    if image.mode in _WIDE or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        top = _WIDE.get(image.mode) or max(float(values.max()), 1.0)
        return np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
    if image.mode in ("P", "PA", "LA", "La", "RGBa") or "transparency" in image.info:
        return np.asarray(image.convert("RGBA"))  # a transparent palette colour keeps its place, as alpha
    if image.mode == "1":
        return np.asarray(image.convert("L"))
    return np.asarray(image.convert("RGB"))  # CMYK, YCbCr, LAB, HSV


def read_image(path: str | Path) -> torch.Tensor:
    """The file's first frame, turned as its EXIF orientation says, as a uint8 tensor (C, H, W).

    Raises:
        ImageReadError: not an image, cut off, or larger than PIL's decompression-bomb limit.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.seek(0)  # animated GIF/WebP/APNG: the first frame
            upright = ImageOps.exif_transpose(image)  # also loads the pixels: a cut-off file fails here
            array = _eight_bit(upright if upright is not None else image)
    except Image.DecompressionBombError as err:
        raise ImageReadError(
            f"The image {path} was not read: {err} Such a file is refused as a possible decompression bomb; "
            "shrink it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it.",
            path,
        ) from err
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, EOFError) as err:
        raise ImageReadError(
            f"The image {path} cannot be read ({err}); it is cut off or not an image. Remove or replace the file.",
            path,
        ) from err
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
