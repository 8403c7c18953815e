"""data=torchvision on small fake copies in each dataset's own layout (download=false): split mapping, class names,
labels that belong to their pixels, lazy reading, clear errors, and one fast_dev_run."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torchvision.datasets import Flowers102

import torchvision_fakes as fakes
from ftlab.data.image import ImageClassificationDataModule, ImagePreprocessing
from ftlab.data.torchvision_sets import TORCHVISION_SETS
from ftlab.train import train
from ftlab.utils.errors import ConfigError, DataFileError
from torchvision_fakes_arrays import ARRAY_WRITERS
from torchvision_fakes_files import FILE_WRITERS

RGB = ImagePreprocessing(16, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
CONF = str(Path(__file__).resolve().parents[1] / "conf")
WRITERS = {**fakes.WRITERS, **FILE_WRITERS, **ARRAY_WRITERS}


def trust_fake_flowers(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Flowers102 checks the MD5 of its two .mat files even without download: expect the fake ones' instead."""
    base = root / "flowers-102"
    files = {
        key: (name, fakes.md5(base / name))
        for key, (name, _) in Flowers102._file_dict.items()
        if key != "image"
    }
    monkeypatch.setattr(Flowers102, "_file_dict", {**Flowers102._file_dict, **files})


def datamodule(name: str, root: Path, **kwargs) -> ImageClassificationDataModule:
    dm = ImageClassificationDataModule(
        RGB, source="torchvision", name=name, root=str(root), val_fraction=0.2, test_fraction=0.2,
        batch_size=4, num_workers=0, **kwargs,
    )  # fmt: skip
    dm.setup()
    return dm


def expected_class(pixels: torch.Tensor) -> int:
    """The class a fake image's colour encodes (see ``fakes.colour``), from its normalised pixels (C, H, W)."""
    red = (pixels[0].mean().item() * 0.5 + 0.5) * 255
    return int(np.argmin([abs(red - fakes.colour(k)[0]) for k in range(4)]))


@pytest.mark.parametrize("name", list(WRITERS))
def test_fake_copy_maps_splits_names_and_labels(tmp_path, monkeypatch, name):
    fake = WRITERS[name](tmp_path)
    if name == "Flowers102":
        trust_fake_flowers(monkeypatch, tmp_path)
    if fake.trusted:  # a fake cannot have the real files' MD5s: accept files that exist
        monkeypatch.setattr(
            f"torchvision.datasets.{fake.trusted}.check_integrity",
            lambda path, md5=None: os.path.isfile(path),
        )
    dm = datamodule(name, tmp_path)
    assert {split: len(d) for split, d in dm.datasets.items()} == fake.sizes
    assert sorted(dm.label_names) == sorted(fake.classes)  # the dataset's own names, not ids
    for split, dataset in dm.datasets.items():
        if name not in ARRAY_WRITERS:  # files: paths kept, each read on access
            assert dataset.images.dtype == object and all(Path(p).is_file() for p in dataset.images)
        for i in range(len(dataset)):
            item = dataset[i]
            assert item["pixel_values"].shape == (3, 16, 16)
            named = dm.label_names[int(item["labels"])]
            assert fake.classes.index(named) == expected_class(item["pixel_values"]), (split, i)
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 16, 16)


def test_validation_split_is_the_datasets_own_where_it_has_one(tmp_path, monkeypatch):
    fakes.flowers102(tmp_path)
    trust_fake_flowers(monkeypatch, tmp_path)
    dm = datamodule("Flowers102", tmp_path)
    val_files = {Path(p).name for p in dm.datasets["validation"].images}
    setid = __import__("scipy.io").io.loadmat(tmp_path / "flowers-102" / "setid.mat", squeeze_me=True)
    assert val_files == {f"image_{i:05d}.jpg" for i in setid["valid"].tolist()}


def test_pets_trainval_is_cut_seeded_and_stratified(tmp_path):
    fakes.oxford_iiit_pet(tmp_path)
    a, b = datamodule("OxfordIIITPet", tmp_path), datamodule("OxfordIIITPet", tmp_path)
    other = datamodule("OxfordIIITPet", tmp_path, seed=1)
    val = list(a.datasets["validation"].images)
    assert val == list(b.datasets["validation"].images) and val != list(other.datasets["validation"].images)
    assert not set(val) & set(a.datasets["train"].images)
    assert all("test" in Path(p).name for p in a.datasets["test"].images)  # the dataset's own test split
    counts = np.bincount(a.datasets["validation"].labels, minlength=3)
    assert counts.min() >= 1  # every breed in validation


def test_dtd_partition_is_an_option(tmp_path):
    fakes.dtd(tmp_path)
    first = datamodule("DTD", tmp_path)
    second = datamodule("DTD", tmp_path, options={"partition": 2})
    assert (len(first.datasets["train"]), len(first.datasets["test"])) == (15, 6)
    assert (len(second.datasets["train"]), len(second.datasets["test"])) == (6, 15)


def test_a_split_without_labels_is_cut_from_train_instead(tmp_path, monkeypatch):
    """FER2013 from train.csv and test.csv: the test rows carry no emotion, so test comes out of train."""
    folder = tmp_path / "fer2013"
    folder.mkdir()
    grey = " ".join(["128"] * 48 * 48)
    (folder / "train.csv").write_text("emotion,pixels\n" + "".join(f"{i % 3},{grey}\n" for i in range(15)))
    (folder / "test.csv").write_text("pixels\n" + f"{grey}\n" * 4)
    monkeypatch.setattr(
        "torchvision.datasets.fer2013.check_integrity", lambda path, md5=None: os.path.isfile(path)
    )
    dm = datamodule("FER2013", tmp_path)
    assert {split: len(d) for split, d in dm.datasets.items()} == {"train": 9, "validation": 3, "test": 3}
    assert dm.label_names == ["angry", "disgust", "fear"]


def test_data_module_holds_paths_not_pixels(tmp_path):
    """Setup on 200 images costs no more memory than on 20: nothing is decoded until an item is read."""
    peaks = []
    for per_class in (7, 67):  # 21 and 201 training images of 96x96 pixels (27 KB each decoded)
        root = tmp_path / str(per_class)
        fakes.food101(root, per_class=per_class, size=96)
        tracemalloc.start()
        dm = datamodule("Food101", root)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert dm.datasets["train"].images.dtype == object
    assert peaks[1] - peaks[0] < 1_000_000, peaks  # decoding 180 more images would add about 5 MB


def test_unknown_name_lists_the_supported_ones():
    with pytest.raises(ConfigError, match="Did you mean Flowers102") as err:
        datamodule("Flowers101", Path("/tmp"))
    for name in ("OxfordIIITPet", "Food101", "DTD", "StanfordCars", "CIFAR10"):
        assert name in str(err.value)


@pytest.mark.parametrize(("name", "how"), [("Flowers102", "data.download=true"), ("StanfordCars", "by hand")])
def test_missing_files_name_the_root_layout_and_the_way_to_get_them(tmp_path, name, how):
    with pytest.raises(DataFileError) as err:
        datamodule(name, tmp_path / "empty")
    message = str(err.value)
    assert f"data.root={str(tmp_path / 'empty')!r}" in message and how in message
    assert TORCHVISION_SETS[name].files in message


def test_options_that_ftlab_sets_or_the_class_lacks_are_refused(tmp_path):
    fakes.dtd(tmp_path)
    for options in ({"split": "test"}, {"partiton": 2}):
        with pytest.raises(ConfigError, match=f"data.options.{next(iter(options))}.*partition"):
            datamodule("DTD", tmp_path, options=options)


def test_every_table_entry_has_a_fake_copy_and_its_split_argument():
    import torchvision.datasets as tvd

    from ftlab.data.torchvision_sets import _parameters

    assert set(WRITERS) == set(TORCHVISION_SETS)  # each dataset ftlab offers is read from a fake copy above
    for name, spec in TORCHVISION_SETS.items():
        params = _parameters(getattr(tvd, name))
        assert "train" in spec.splits, name
        for kwargs in spec.splits.values():
            assert set(kwargs) <= set(params), name


def test_fast_dev_run_on_fake_flowers(tmp_path, monkeypatch):
    root = tmp_path / "flowers"
    fakes.flowers102(root)
    trust_fake_flowers(monkeypatch, root)
    out = tmp_path / "run"
    out.mkdir()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"paths.output_dir={out}", f"paths.log_dir={out}", f"paths.cache_dir={out}/cache",
                "callbacks.progress_bar.kind=log", "logger=csv", "model=tiny_resnet", "debug=fdr",
                "data=torchvision", "data.name=Flowers102", f"data.root={root}", "data.download=false",
                "data.num_workers=0", "data.batch_size=4",
            ],
        )  # fmt: skip
    metrics = train(cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0 and (out / "metrics.json").is_file()
    names = json.loads((out / "labels.json").read_text())["names"]
    assert sorted(names) == sorted(["pink primrose", "hard-leaved pocket orchid", "canterbury bells"])
