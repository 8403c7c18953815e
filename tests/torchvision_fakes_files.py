"""More fake copies of file-based torchvision datasets in their extracted layouts (torchvision 0.29); see
``torchvision_fakes`` for the conventions (colour encodes class, varying sizes, ``Fake`` sizes and names)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from torchvision_fakes import TEST, TRAIN, VAL, Fake, _cut, image


def clevr(root: Path) -> Fake:
    """clevr/CLEVR_v1.0/images/{train,val,test}/*.png, scenes/CLEVR_{train,val}_scenes.json; the label is the
    number of objects (3, 4, 5 here); the test split has no scenes, so ftlab cuts test from train."""
    data = root / "clevr" / "CLEVR_v1.0"
    (data / "scenes").mkdir(parents=True)
    for split, count in (("train", TRAIN), ("val", VAL), ("test", TEST)):
        scenes = []
        for n in range(3 * count):
            name = f"CLEVR_{split}_{n:06d}.png"
            image(data / "images" / split / name, n % 3, n)
            scenes.append({"image_filename": name, "objects": [{}] * (n % 3 + 3)})
        if split != "test":
            (data / "scenes" / f"CLEVR_{split}_scenes.json").write_text(json.dumps({"scenes": scenes}))
    return _cut(TRAIN, VAL, None, ["3", "4", "5"])


def rendered_sst2(root: Path) -> Fake:
    """rendered-sst2/{train,valid,test}/{negative,positive}/<n>.png."""
    for split, count in (("train", TRAIN), ("valid", VAL), ("test", TEST)):
        for k, name in enumerate(("negative", "positive")):
            for n in range(count):
                image(root / "rendered-sst2" / split / name / f"{n}.png", k, n)
    return _cut(TRAIN, VAL, TEST, ["negative", "positive"])


def imagenette(root: Path) -> Fake:
    """imagenette2/{train,val}/<wnid>/<n>.JPEG; its val is ftlab's test."""
    wnids = ["n01440764", "n02102040", "n02979186"]
    for split, count in (("train", TRAIN), ("val", TEST)):
        for k, wnid in enumerate(wnids):
            for n in range(count):
                image(root / "imagenette2" / split / wnid / f"{wnid}_{n}.JPEG", k, n)
    return _cut(TRAIN, None, TEST, ["tench", "English springer", "cassette player"])


def imagenet(root: Path) -> Fake:
    """meta.bin (wnid -> class names, val wnids) beside extracted train/<wnid>/ and val/<wnid>/ folders."""
    wnids = {
        "n01440764": ("tench", "Tinca tinca"),
        "n01443537": ("goldfish",),
        "n01484850": ("great white shark",),
    }
    root.mkdir(parents=True, exist_ok=True)
    torch.save((wnids, list(wnids) * TEST), root / "meta.bin")
    for split, count in (("train", TRAIN), ("val", TEST)):
        for k, wnid in enumerate(wnids):
            for n in range(count):
                image(root / split / wnid / f"{wnid}_{n}.JPEG", k, n)
    return _cut(TRAIN, None, TEST, ["tench", "goldfish", "great white shark"])


def sun397(root: Path) -> Fake:
    """SUN397/ClassName.txt ("/a/abbey" per line) and SUN397/<letter>/<class path>/sun_<id>.jpg; no splits."""
    classes = ["/a/abbey", "/a/airplane_cabin", "/b/bakery/shop"]
    (root / "SUN397").mkdir(parents=True)
    (root / "SUN397" / "ClassName.txt").write_text("\n".join(classes) + "\n")
    for k, name in enumerate(classes):
        for n in range(TRAIN):
            image(root / "SUN397" / name.lstrip("/") / f"sun_{k}{n}.jpg", k, n)
    return _cut(TRAIN, None, None, [c[3:] for c in classes])


def caltech256(root: Path) -> Fake:
    """caltech256/256_ObjectCategories/<%03d.name>/<%03d>_<%04d>.jpg; no splits."""
    classes = ["001.ak47", "002.american-flag", "003.backpack"]
    for k, name in enumerate(classes):
        for n in range(TRAIN):
            image(root / "caltech256" / "256_ObjectCategories" / name / f"{k + 1:03d}_{n + 1:04d}.jpg", k, n)
    return _cut(TRAIN, None, None, classes)


def places365(root: Path) -> Fake:
    """categories_places365.txt, places365_{train_standard,val}.txt ("<file> <id>"), data_large_standard/ and
    val_large/; its val is ftlab's test."""
    classes = ["/a/airfield", "/a/airplane_cabin", "/a/airport_terminal"]
    root.mkdir(parents=True, exist_ok=True)
    (root / "categories_places365.txt").write_text("".join(f"{c} {k}\n" for k, c in enumerate(classes)))
    train, val = [], []
    for k, name in enumerate(classes):
        for n in range(TRAIN):
            image(root / "data_large_standard" / name.lstrip("/") / f"{n:08d}.jpg", k, n)
            train.append(f"{name}/{n:08d}.jpg {k}")
        for n in range(TEST):
            file = f"Places365_val_{k * TEST + n:08d}.jpg"
            image(root / "val_large" / file, k, n)
            val.append(f"{file} {k}")
    (root / "places365_train_standard.txt").write_text("\n".join(train) + "\n")
    (root / "places365_val.txt").write_text("\n".join(val) + "\n")
    fake = _cut(TRAIN, None, TEST, classes)
    fake.trusted = "places365"
    return fake


FILE_WRITERS = {
    "CLEVRClassification": clevr,
    "RenderedSST2": rendered_sst2,
    "Imagenette": imagenette,
    "ImageNet": imagenet,
    "SUN397": sun397,
    "Caltech256": caltech256,
    "Places365": places365,
}
