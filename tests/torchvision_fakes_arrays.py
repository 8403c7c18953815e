"""Fake copies of the torchvision datasets stored as pixel arrays (idx, pickle, .mat, binary, CSV, libsvm), in each
one's extracted layout (torchvision 0.29). Pixels encode the class as in ``torchvision_fakes.colour``. Datasets
that check their files' MD5 even without download name the module whose ``check_integrity`` a test relaxes to
"the file exists" (``Fake.trusted``): a fake cannot have the real files' checksums.
"""

from __future__ import annotations

import bz2
import pickle
import struct
from pathlib import Path

import numpy as np
import scipy.io as sio

from torchvision_fakes import TEST, TRAIN, Fake, _cut, colour


def _pixels(labels: np.ndarray, shape: tuple[int, ...], grey: bool = False) -> np.ndarray:
    """(N, *shape) uint8 images: the class's colour (its red value when ``grey``), channels last."""
    values = [colour(int(k))[0] if grey else colour(int(k)) for k in labels]
    return np.stack([np.broadcast_to(np.asarray(v, dtype=np.uint8), shape) for v in values])


def _labels(count: int) -> np.ndarray:
    return np.repeat(np.arange(3, dtype=np.uint8), count)


def _idx(raw: Path, prefix: str, labels: np.ndarray) -> None:
    """The MNIST family's idx files: big-endian magic, sizes, then bytes."""
    raw.mkdir(parents=True, exist_ok=True)
    images = _pixels(labels, (28, 28), grey=True)
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 2051, len(images), 28, 28) + images.tobytes()
    )
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
        struct.pack(">II", 2049, len(labels)) + labels.tobytes()
    )


def mnist_like(folder: str, names: list[str], emnist: str | None = None):
    """MNIST, FashionMNIST, KMNIST (<folder>/raw/{train,t10k}-...) or EMNIST (emnist-<variant>-{train,test}-...)."""

    def write(root: Path) -> Fake:
        for split, count in (("train", TRAIN), ("test", TEST)):
            prefix = f"emnist-{emnist}-{split}" if emnist else ("train" if split == "train" else "t10k")
            _idx(root / folder / "raw", prefix, _labels(count))
        return _cut(TRAIN, None, TEST, names)

    return write


def qmnist(root: Path) -> Fake:
    """QMNIST/raw/qmnist-{train,test}-images-idx3-ubyte and -labels-idx2-int: 8 int32 columns a row, class first."""
    raw = root / "QMNIST" / "raw"
    for split, count in (("train", TRAIN), ("test", TEST)):
        labels = _labels(count)
        _idx(raw, f"qmnist-{split}", labels)  # the images file; its labels-idx1 twin is unused
        columns = np.zeros((len(labels), 8), dtype=">i4")
        columns[:, 0] = labels
        header = struct.pack(">IIII", 0x0C02, len(labels), 8, 0)[:12]  # int32 (0x0C), 2 dimensions
        (raw / f"qmnist-{split}-labels-idx2-int").write_bytes(header + columns.tobytes())
    return _cut(TRAIN, None, TEST, ["0 - zero", "1 - one", "2 - two"])


def cifar(hundred: bool):
    """cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} or cifar-100-python/{train,test,meta}."""

    def write(root: Path) -> Fake:
        folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
        folder.mkdir(parents=True)
        names = ["apple", "aquarium_fish", "baby"] if hundred else ["airplane", "automobile", "bird"]
        key = "fine_labels" if hundred else "labels"
        batches = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
        for batch, count in [*((b, TRAIN) for b in batches), ("test" if hundred else "test_batch", TEST)]:
            labels = _labels(count)
            data = (
                _pixels(labels, (32, 32, 3)).transpose(0, 3, 1, 2).reshape(len(labels), -1)
            )  # rows: R, G, B
            (folder / batch).write_bytes(pickle.dumps({"data": data, key: labels.tolist()}))
        meta = {"fine_label_names" if hundred else "label_names": names}
        (folder / ("meta" if hundred else "batches.meta")).write_bytes(pickle.dumps(meta))
        per_split = TRAIN * (1 if hundred else 5)
        return Fake(_cut(per_split, None, TEST, names).sizes, names, trusted="cifar")

    return write


def svhn(root: Path) -> Fake:
    """{train,test}_32x32.mat: X (32, 32, 3, N), y (N, 1) with digit 0 stored as 10."""
    root.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", TRAIN), ("test", TEST)):
        labels = _labels(count)
        stored = np.where(labels == 0, 10, labels).reshape(-1, 1)
        sio.savemat(
            root / f"{split}_32x32.mat",
            {"X": _pixels(labels, (32, 32, 3)).transpose(1, 2, 3, 0), "y": stored},
        )
    return Fake(_cut(TRAIN, None, TEST, ["0", "1", "2"]).sizes, ["0", "1", "2"], trusted="svhn")


def stl10(root: Path) -> Fake:
    """stl10_binary/{train,test}_{X,y}.bin (channel planes, 1-based labels), unlabeled_X.bin, class_names.txt."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    names = ["airplane", "bird", "car"]
    for split, count in (("train", TRAIN), ("test", TEST), ("unlabeled", 1)):
        labels = _labels(count)
        (folder / f"{split}_X.bin").write_bytes(_pixels(labels, (96, 96, 3)).transpose(0, 3, 1, 2).tobytes())
        if split != "unlabeled":
            (folder / f"{split}_y.bin").write_bytes((labels + 1).tobytes())
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    return Fake(_cut(TRAIN, None, TEST, names).sizes, names, trusted="stl10")


def usps(root: Path) -> Fake:
    """usps.bz2 / usps.t.bz2 in libsvm format: "<1-based label> 1:<v> ... 256:<v>" with v in [-1, 1]."""
    root.mkdir(parents=True, exist_ok=True)
    for name, count in (("usps.bz2", TRAIN), ("usps.t.bz2", TEST)):
        lines = []
        for k in _labels(count):
            value = colour(int(k))[0] / 255 * 2 - 1
            lines.append(f"{k + 1} " + " ".join(f"{i}:{value:.6f}" for i in range(1, 257)))
        (root / name).write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))
    return _cut(TRAIN, None, TEST, ["0", "1", "2"])


def fer2013(root: Path) -> Fake:
    """fer2013/fer2013.csv: emotion, pixels (48x48 grey values), Usage (Training / PublicTest / PrivateTest)."""
    folder = root / "fer2013"
    folder.mkdir(parents=True)
    rows = ["emotion,pixels,Usage"]
    for usage, count in (("Training", TRAIN), ("PublicTest", 1), ("PrivateTest", 1)):
        for k in _labels(count):
            rows.append(f"{k}," + " ".join([str(colour(int(k))[0])] * 48 * 48) + f",{usage}")
    (folder / "fer2013.csv").write_text("\n".join(rows) + "\n")
    return Fake(
        _cut(TRAIN, None, TEST, ["angry", "disgust", "fear"]).sizes, ["angry", "disgust", "fear"], "fer2013"
    )


def semeion(root: Path) -> Fake:
    """semeion.data: 256 pixel values in {0, 1} then a one-hot of 10 digits per line (no splits)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for k in _labels(TRAIN):  # pixels on/off by position, so each digit is a different mean grey
        pixels = (np.arange(256) % 4 < k + 1).astype(float)
        lines.append(
            " ".join(f"{p:.4f}" for p in pixels) + " " + " ".join("1" if d == k else "0" for d in range(10))
        )
    (root / "semeion.data").write_text("\n".join(lines) + "\n")
    return Fake(_cut(TRAIN, None, None, ["0", "1", "2"]).sizes, ["0", "1", "2"], trusted="semeion")


ARRAY_WRITERS = {
    "MNIST": mnist_like("MNIST", ["0 - zero", "1 - one", "2 - two"]),
    "FashionMNIST": mnist_like("FashionMNIST", ["T-shirt/top", "Trouser", "Pullover"]),
    "KMNIST": mnist_like("KMNIST", ["o", "ki", "su"]),
    "QMNIST": qmnist,
    "EMNIST": mnist_like("EMNIST", ["0", "1", "2"], emnist="balanced"),
    "CIFAR10": cifar(hundred=False),
    "CIFAR100": cifar(hundred=True),
    "SVHN": svhn,
    "STL10": stl10,
    "USPS": usps,
    "FER2013": fer2013,
    "SEMEION": semeion,
}
