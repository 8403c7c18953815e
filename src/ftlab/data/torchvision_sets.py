"""torchvision classification datasets by class name, read lazily, with their own split names mapped to ftlab's.

``TORCHVISION_SETS`` is the table: for each supported dataset, the constructor arguments that give ftlab's
``train``/``validation``/``test`` splits (a split the dataset lacks is cut from train, seeded and stratified, by
the data module), where its files lie under ``data.root`` and how to get them. Only file paths and label ids are
read at setup (from the dataset's own lists: ``samples``, ``_image_files``/``_labels``, ...); images are decoded
per item by the data module. Datasets torchvision itself keeps as one in-memory array (MNIST family, CIFAR, SVHN,
STL10, USPS, SEMEION, FER2013) are taken as that array, without a copy where the dtype allows.
"""

from __future__ import annotations

import difflib
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ftlab.utils.errors import ConfigError, DataError, DataFileError

Split = tuple[np.ndarray, np.ndarray]
DOWNLOAD = "set data.download=true to fetch them (needs internet)"


@dataclass(frozen=True)
class TorchvisionSet:
    """How ftlab reads one torchvision dataset.

    Attributes:
        splits: ftlab split (``train``, ``validation``, ``test``) -> the constructor's split arguments.
        files: where the extracted files lie under ``data.root`` (for the error when they are missing).
        defaults: other constructor arguments; ``data.options`` overrides them.
        classes: class names by id, for datasets that keep none themselves.
        get: how to get the files (default: ``data.download=true``).
    """

    splits: dict[str, dict[str, Any]]
    files: str
    defaults: dict[str, Any] = field(default_factory=dict)
    classes: tuple[str, ...] | None = None
    get: str = DOWNLOAD


def _flag(files: str, **kwargs: Any) -> TorchvisionSet:
    """A dataset chosen by ``train=True/False``: its test split is ftlab's test; validation is cut from train."""
    return TorchvisionSet({"train": {"train": True}, "test": {"train": False}}, files, **kwargs)


def _named(names: str, files: str, **kwargs: Any) -> TorchvisionSet:
    """A dataset chosen by ``split=<its name>``; ``names`` are its train, validation and test split names, ``-``
    where it has no such labelled split (cut from train by the data module)."""
    pairs = zip(("train", "validation", "test"), names.split(), strict=True)
    return TorchvisionSet({s: {"split": n} for s, n in pairs if n != "-"}, files, **kwargs)


def _whole(files: str, **kwargs: Any) -> TorchvisionSet:
    """A dataset without splits: validation and test are cut from it."""
    return TorchvisionSet({"train": {}}, files, **kwargs)


MANUAL = "download them by hand from the dataset's site (torchvision cannot) and extract them there"
FER_GET = "download them from Kaggle's FER2013 challenge page"
FER_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
TORCHVISION_SETS: dict[str, TorchvisionSet] = {
    "CIFAR10": _flag("cifar-10-batches-py/"),
    "CIFAR100": _flag("cifar-100-python/"),
    "MNIST": _flag("MNIST/raw/ (the four idx files)"),
    "FashionMNIST": _flag("FashionMNIST/raw/"),
    "KMNIST": _flag("KMNIST/raw/"),
    "EMNIST": _flag("EMNIST/raw/", defaults={"split": "balanced"}),  # here `split` is the EMNIST variant
    "QMNIST": _flag("QMNIST/raw/"),
    "USPS": _flag("usps.bz2 and usps.t.bz2"),
    "SVHN": _named("train - test", "train_32x32.mat and test_32x32.mat"),
    "STL10": _named("train - test", "stl10_binary/"),
    "GTSRB": _named(
        "train - test", "gtsrb/GTSRB/Training/, gtsrb/GTSRB/Final_Test/Images/, gtsrb/GT-final_test.csv"
    ),
    "Country211": _named("train valid test", "country211/{train,valid,test}/<class>/"),
    "DTD": _named("train val test", "dtd/dtd/images/ and dtd/dtd/labels/", defaults={"partition": 1}),
    "FGVCAircraft": _named(
        "train val test", "fgvc-aircraft-2013b/data/", defaults={"annotation_level": "variant"}
    ),
    "Flowers102": _named(
        "train val test", "flowers-102/jpg/, flowers-102/imagelabels.mat, flowers-102/setid.mat"
    ),
    "Food101": _named("train - test", "food-101/images/ and food-101/meta/"),
    "OxfordIIITPet": _named("trainval - test", "oxford-iiit-pet/images/ and oxford-iiit-pet/annotations/"),
    "StanfordCars": _named(
        "train - test",
        "stanford_cars/: cars_train/, cars_test/, devkit/, cars_test_annos_withlabels.mat",
        get=MANUAL,
    ),
    "CLEVRClassification": _named("train val -", "clevr/CLEVR_v1.0/"),  # its test split has no labels
    "FER2013": _named(
        "train - test", "fer2013/fer2013.csv (or icml_face_data.csv)", classes=FER_CLASSES, get=FER_GET
    ),
    "RenderedSST2": _named("train val test", "rendered-sst2/{train,valid,test}/"),
    # The next three have no labelled test split; their `val` is the split results are reported on: ftlab's test.
    "Imagenette": _named(
        "train - val", "imagenette2/ (or imagenette2-320/, -160/)", defaults={"size": "full"}
    ),
    "ImageNet": _named(
        "train - val", "ILSVRC2012_devkit_t12.tar.gz and train/, val/ (or their tars)", get=MANUAL
    ),
    "Places365": _named(
        "train-standard - val",
        "categories_places365.txt, places365_*.txt, data_large_standard/, val_large/",
        defaults={"small": False},
    ),
    # Not here: LFWPeople (its splits hold different people, so no class is in both), PCAM (HDF5 files that need
    # h5py, read whole per item), CelebA (attributes, not one class).
    "SUN397": _whole("SUN397/"),
    "EuroSAT": _whole("eurosat/2750/<class>/"),
    "Caltech101": _whole("caltech101/101_ObjectCategories/"),
    "Caltech256": _whole("caltech256/256_ObjectCategories/"),
    "SEMEION": _whole("semeion.data"),
}
# Set by ftlab, or changing what a label is (OxfordIIITPet's target_types, QMNIST's what/compat), so not options.
FTLAB_ARGUMENTS = frozenset(
    ("root", "download", "transform", "target_transform", "transforms", "loader")
    + ("target_type", "target_types", "what", "compat")
)
# Caltech keeps (category id, per-category number) and builds the path in __getitem__; the same pattern here.
CALTECH_FILES = {
    "Caltech101": "101_ObjectCategories/{category}/image_{number:04d}.jpg",
    "Caltech256": "256_ObjectCategories/{category}/{label:03d}_{number:04d}.jpg",
}


def _spec(name: str | None) -> tuple[str, TorchvisionSet]:
    if name is not None and name in TORCHVISION_SETS:
        return name, TORCHVISION_SETS[name]
    close = difflib.get_close_matches(str(name), TORCHVISION_SETS, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]}?" if close else ""
    raise ConfigError(
        f"data.name={name!r} is not a supported torchvision classification dataset.{hint} Supported (the class "
        f"names in torchvision.datasets): {', '.join(sorted(TORCHVISION_SETS, key=str.lower))}."
    )


def _parameters(cls: type) -> set[str]:
    """The constructor's argument names, following ``**kwargs`` into the base classes (EMNIST, QMNIST -> MNIST)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        params = inspect.signature(klass.__init__).parameters.values()  # type: ignore[misc]
        names |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"self"}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


def _arguments(name: str, spec: TorchvisionSet, cls: type, options: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments shared by every split: the table's defaults, then ``data.options``."""
    params = _parameters(cls)
    taken = FTLAB_ARGUMENTS | {key for kwargs in spec.splits.values() for key in kwargs}
    taken -= set(spec.defaults)
    for key in options:
        if key in taken or key not in params:
            allowed = sorted(set(params) - taken)
            raise ConfigError(
                f"data.options.{key} cannot be given to torchvision's {name}: ftlab sets root, download, the split "
                f"and what a label is itself; the options it takes are {allowed or 'none'}."
            )
    return {**spec.defaults, **options}


def _class_names(dataset: Any, spec: TorchvisionSet) -> list[str] | None:
    """The dataset's own class names by id (a tuple of synonyms gives its first); None: ids are the names."""
    names = spec.classes or getattr(dataset, "classes", None) or getattr(dataset, "categories", None)
    to_index = getattr(dataset, "class_to_idx", None)
    if not names and isinstance(to_index, dict) and sorted(to_index.values()) == list(range(len(to_index))):
        names = sorted(to_index, key=to_index.__getitem__)  # a dataset that keeps only a name -> id map
    if not names:
        return None
    return [str(n[0] if isinstance(n, (tuple, list)) else n) for n in names]


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def _paths_and_ids(name: str, dataset: Any) -> tuple[list[Any], list[Any]] | None:
    """File paths and label ids from the dataset's own lists, without opening an image; None if it keeps none."""
    for attr in ("samples", "_samples", "imgs"):  # [(path, label)]: ImageFolder kin, GTSRB, StanfordCars, ...
        pairs = getattr(dataset, attr, None)
        if isinstance(pairs, list) and (not pairs or _is_path(pairs[0][0])):
            return [p for p, _ in pairs], [t for _, t in pairs]
    for attr in ("_image_files", "_images"):  # Flowers102, DTD, Food101, FGVCAircraft, OxfordIIITPet, ...
        files = getattr(dataset, attr, None)
        if files is not None and hasattr(dataset, "_labels"):
            return list(files), list(dataset._labels)
    if name in CALTECH_FILES:
        pattern = CALTECH_FILES[name]
        paths = [
            os.path.join(dataset.root, pattern.format(category=dataset.categories[y], label=y + 1, number=n))
            for y, n in zip(dataset.y, dataset.index, strict=True)
        ]
        return paths, list(dataset.y)
    return None


def _arrays_and_ids(dataset: Any) -> tuple[np.ndarray, list[Any]] | None:
    """The one pixel array torchvision already holds in memory (MNIST family, CIFAR, SVHN, STL10, USPS, ...)."""
    data = getattr(dataset, "data", None)
    targets = getattr(dataset, "targets", getattr(dataset, "labels", None))
    if data is not None and targets is not None and not isinstance(data, list):
        images = np.asarray(data)
        if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
            images = images.transpose(0, 2, 3, 1)  # (N, C, H, W) as SVHN/STL10 keep it -> (N, H, W, C)
        ids = np.asarray(targets)
        ids = ids[:, 0] if ids.ndim == 2 else ids  # QMNIST: 8 columns a row, the class first
        return images.astype(np.uint8, copy=False), ids.tolist()
    samples = getattr(dataset, "_samples", None)  # FER2013: [(48x48 uint8 tensor, label or None)]
    if isinstance(samples, list) and samples and not _is_path(samples[0][0]):
        return np.stack([np.asarray(image) for image, _ in samples]).astype(np.uint8, copy=False), [
            t for _, t in samples
        ]
    return None


def _split_arrays(name: str, dataset: Any, spec: TorchvisionSet) -> Split | None:
    """(images, class names) of one split: paths or the in-memory array; None if the split has no labels."""
    found: Any = _paths_and_ids(name, dataset) or _arrays_and_ids(dataset)
    if found is None:
        raise DataError(
            f"ftlab cannot find the file list or labels of torchvision's {name} (torchvision changed how it stores "
            "them); report this with your torchvision version."
        )
    images, ids = found
    if any(i is None or i == -1 for i in ids):  # e.g. FER2013's test.csv, STL10's unlabeled images
        return None
    if not isinstance(images, np.ndarray):
        images = np.asarray([str(p) for p in images], dtype=object)
    names = _class_names(dataset, spec)
    labels = [names[int(i)] if names and int(i) < len(names) else str(int(i)) for i in ids]
    return images, np.asarray(labels, dtype=str) if labels else np.asarray([], dtype=str)


def load_torchvision(
    name: str | None, root: str | None, download: bool, options: dict[str, Any] | None = None
) -> dict[str, Split]:
    """A torchvision classification dataset by class name as ``{split: (images, labels)}``; images are paths
    (read per item) or the array torchvision keeps in memory. See ``TORCHVISION_SETS`` for the split names."""
    import torchvision.datasets as tvd

    name, spec = _spec(name)
    if not root:
        raise ConfigError(
            "data.root is not set: data=torchvision needs data.root=<folder for the dataset files>."
        )
    cls = getattr(tvd, name)
    shared = _arguments(name, spec, cls, dict(options or {}))
    if "download" in _parameters(cls):
        shared["download"] = download
    folder = str(Path(root).expanduser())
    splits: dict[str, Split] = {}
    for split, kwargs in spec.splits.items():
        try:
            dataset = cls(folder, **shared, **kwargs)
        except (RuntimeError, OSError) as err:
            get = spec.get
            if download and get == DOWNLOAD:
                get = "copy them there from a machine with internet (data.download=true failed here)"
            raise DataFileError(
                f"torchvision's {name} could not be read from data.root={root!r}: expected {spec.files} there "
                f"(torchvision says: {err}). To get the files, {get}; or point data.root at the folder that holds "
                "them."
            ) from err
        except ValueError as err:  # an option value torchvision rejects, or download=true where it cannot
            raise ConfigError(f"torchvision's {name} refused its arguments {shared | kwargs}: {err}") from err
        pair = _split_arrays(name, dataset, spec)
        if pair is not None:
            splits[split] = pair
    if "train" not in splits or not len(splits["train"][1]):
        raise DataError(f"torchvision's {name} under data.root={root!r} has no labelled training images.")
    return splits
