"""Small fake copies of torchvision datasets in each one's extracted on-disk layout (torchvision 0.29), for
``download=false``. Every image is a solid colour that encodes its class (``colour(k)``) and sizes vary, so a test
can check that each item's label belongs to its pixels. Each writer returns ``Fake``: the expected ftlab split
sizes (with ``val_fraction=test_fraction=0.2``) and the class names in id order.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io as sio
from PIL import Image

TRAIN, VAL, TEST = 5, 2, 2  # images per class in the dataset's own splits


@dataclass
class Fake:
    sizes: dict[str, int]  # ftlab split -> number of images after setup
    classes: list[str]  # class names by id, as ftlab should report them
    trusted: str | None = (
        None  # the torchvision module whose MD5 checks a test relaxes (see torchvision_fakes_arrays)
    )


def colour(k: int) -> tuple[int, int, int]:
    return (30 + 70 * k, 220 - 60 * k, 90)


def image(path: Path, k: int, i: int, size: int = 0) -> None:
    """A solid-colour image of class ``k``; sizes differ image to image (as in the real sets)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    side = size or 20 + (7 * i) % 23
    Image.new("RGB", (side + (5 * i) % 11, side), colour(k)).save(path, quality=95)


def _cut(train: int, val: int | None, test: int | None, classes: list[str]) -> Fake:
    """Sizes after the data module cuts what is missing from train (0.2 of train for each)."""
    n = len(classes)
    cut_test = 0 if test is not None else round(0.2 * train * n)
    cut_val = 0 if val is not None else round(0.2 * train * n)
    sizes = {
        "train": train * n - cut_test - cut_val,
        "validation": val * n if val is not None else cut_val,
        "test": test * n if test is not None else cut_test,
    }
    return Fake(sizes, classes)


def flowers102(root: Path, per_class: int = TRAIN) -> Fake:
    """flowers-102/jpg/image_%05d.jpg, imagelabels.mat (1-based labels), setid.mat (trnid/valid/tstid)."""
    base = root / "flowers-102"
    ids = {"trnid": [], "valid": [], "tstid": []}
    labels = []
    counts = {"trnid": per_class, "valid": VAL, "tstid": TEST}
    for k in range(3):
        for key, count in counts.items():
            for _ in range(count):
                labels.append(k + 1)
                ids[key].append(len(labels))
                image(base / "jpg" / f"image_{len(labels):05d}.jpg", k, len(labels))
    sio.savemat(base / "imagelabels.mat", {"labels": np.asarray(labels)})
    sio.savemat(base / "setid.mat", {key: np.asarray(value) for key, value in ids.items()})
    names = ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"]
    return _cut(per_class, VAL, TEST, names)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def oxford_iiit_pet(root: Path) -> Fake:
    """oxford-iiit-pet/images/<Breed>_<n>.jpg and annotations/{trainval,test}.txt ("id class species breed")."""
    base = root / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    breeds = ["Abyssinian", "american_bulldog", "Bengal"]
    for split, count in (("trainval", TRAIN + VAL), ("test", TEST)):
        lines = []
        for k, breed in enumerate(breeds):
            for n in range(count):
                image_id = f"{breed}_{split}{n}"
                image(base / "images" / f"{image_id}.jpg", k, n)
                lines.append(f"{image_id} {k + 1} {1 if breed[0].isupper() else 2} {n + 1}")
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return _cut(TRAIN + VAL, None, TEST, ["Abyssinian", "American Bulldog", "Bengal"])


def dtd(root: Path) -> Fake:
    """dtd/dtd/images/<class>/<class>_<n>.jpg, dtd/dtd/labels/{train,val,test}<partition>.txt; partition 2 swaps
    train and test sizes, so a test can tell the partitions apart."""
    data = root / "dtd" / "dtd"
    classes = ["banded", "blotchy", "braided"]
    (data / "labels").mkdir(parents=True)
    n = 0
    files: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for k, name in enumerate(classes):
        for split, count in (("train", TRAIN), ("val", VAL), ("test", TEST)):
            for _ in range(count):
                n += 1
                image(data / "images" / name / f"{name}_{n:04d}.jpg", k, n)
                files[split].append(f"{name}/{name}_{n:04d}.jpg")
    for split, lines in files.items():
        (data / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")
    swapped = {"train": files["test"], "val": files["val"], "test": files["train"]}
    for split, lines in swapped.items():
        (data / "labels" / f"{split}2.txt").write_text("\n".join(lines) + "\n")
    return _cut(TRAIN, VAL, TEST, classes)


def food101(root: Path, per_class: int = TRAIN, size: int = 0) -> Fake:
    """food-101/images/<class>/<n>.jpg and food-101/meta/{train,test}.json ({class: ["<class>/<n>", ...]})."""
    base = root / "food-101"
    (base / "meta").mkdir(parents=True)
    classes = ["apple_pie", "baby_back_ribs", "baklava"]
    for split, count in (("train", per_class), ("test", TEST)):
        meta = {}
        for k, name in enumerate(classes):
            meta[name] = [f"{name}/{split}{n}" for n in range(count)]
            for n in range(count):
                image(base / "images" / name / f"{split}{n}.jpg", k, n, size)
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))
    return _cut(per_class, None, TEST, classes)


def stanford_cars(root: Path) -> Fake:
    """stanford_cars/{cars_train,cars_test}/<n>.jpg, devkit/cars_train_annos.mat, devkit/cars_meta.mat and
    cars_test_annos_withlabels.mat (struct arrays with fname and 1-based class)."""
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012"]
    for split, count, mat in (
        ("train", TRAIN, base / "devkit" / "cars_train_annos.mat"),
        ("test", TEST, base / "cars_test_annos_withlabels.mat"),
    ):
        annotations = np.zeros((3 * count,), dtype=[("fname", "O"), ("class", "O")])
        for i in range(3 * count):
            annotations[i] = (f"{i + 1:05d}.jpg", i % 3 + 1)
            image(base / f"cars_{split}" / f"{i + 1:05d}.jpg", i % 3, i)
        sio.savemat(mat, {"annotations": annotations})
    sio.savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.asarray(names, dtype=object)})
    return _cut(TRAIN, None, TEST, names)


def fgvc_aircraft(root: Path) -> Fake:
    """fgvc-aircraft-2013b/data/variants.txt, images_variant_{train,val,test}.txt ("<id> <variant>"), images/."""
    data = root / "fgvc-aircraft-2013b" / "data"
    data.mkdir(parents=True)
    variants = ["707-320", "727-200", "A300B4"]
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    n = 1000000
    for split, count in (("train", TRAIN), ("val", VAL), ("test", TEST)):
        lines = []
        for k, variant in enumerate(variants):
            for _ in range(count):
                n += 1
                image(data / "images" / f"{n}.jpg", k, n)
                lines.append(f"{n} {variant}")
        (data / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    return _cut(TRAIN, VAL, TEST, variants)


def country211(root: Path) -> Fake:
    """country211/{train,valid,test}/<ISO code>/<n>.jpg (an ImageFolder per split)."""
    codes = ["AD", "AE", "AF"]
    for split, count in (("train", TRAIN), ("valid", VAL), ("test", TEST)):
        for k, code in enumerate(codes):
            for n in range(count):
                image(root / "country211" / split / code / f"{n}.jpg", k, n)
    return _cut(TRAIN, VAL, TEST, codes)


def gtsrb(root: Path) -> Fake:
    """gtsrb/GTSRB/Training/<%05d class>/<n>.ppm; Final_Test/Images/<n>.ppm with GT-final_test.csv (';')."""
    base = root / "gtsrb"
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for k in range(3):
        for n in range(TRAIN):
            image(base / "GTSRB" / "Training" / f"{k:05d}" / f"00000_{n:05d}.ppm", k, n)
        for n in range(TEST):
            name = f"{k * TEST + n:05d}.ppm"
            image(base / "GTSRB" / "Final_Test" / "Images" / name, k, n)
            rows.append(f"{name};30;30;1;1;29;29;{k}")
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    return _cut(TRAIN, None, TEST, ["0", "1", "2"])  # GTSRB keeps no class names: ids


def eurosat(root: Path) -> Fake:
    """eurosat/2750/<class>/<class>_<n>.jpg: one folder, no splits."""
    classes = ["AnnualCrop", "Forest", "HerbaceousVegetation"]
    for k, name in enumerate(classes):
        for n in range(TRAIN):
            image(root / "eurosat" / "2750" / name / f"{name}_{n + 1}.jpg", k, n, size=64)
    return _cut(TRAIN, None, None, classes)


def caltech101(root: Path) -> Fake:
    """caltech101/101_ObjectCategories/<category>/image_%04d.jpg, BACKGROUND_Google included (torchvision drops
    it)."""
    base = root / "caltech101" / "101_ObjectCategories"
    classes = ["accordion", "airplanes", "anchor"]
    image(base / "BACKGROUND_Google" / "image_0001.jpg", 3, 0)
    for k, name in enumerate(classes):
        for n in range(TRAIN):
            image(base / name / f"image_{n + 1:04d}.jpg", k, n)
    return _cut(TRAIN, None, None, classes)


WRITERS = {
    "Flowers102": flowers102,
    "OxfordIIITPet": oxford_iiit_pet,
    "DTD": dtd,
    "Food101": food101,
    "StanfordCars": stanford_cars,
    "FGVCAircraft": fgvc_aircraft,
    "Country211": country211,
    "GTSRB": gtsrb,
    "EuroSAT": eurosat,
    "Caltech101": caltech101,
}
