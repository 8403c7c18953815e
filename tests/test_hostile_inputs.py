"""Untrusted files and hostile inputs (issue 18, points 4 and 5).

Files with a pickle payload (it would create a marker file when unpickled) in the places ftlab loads from that
tests/test_checkpoint_safety.py does not cover: a run's ``last.ckpt`` on resume, the token cache and the feature
cache. Then prediction and evaluation on junk texts and images.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from ftlab.finetuning.feature_cache import maybe_cache_features
from ftlab.runs.rebuild import build_module
from ftlab.train import train
from ftlab.utils.errors import ModelLoadError

from conftest import compose_cfg, tiny_text_overrides


class Payload:
    """Unpickling this creates ``marker`` (``builtins.open``): what a malicious file would do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_resume_refuses_a_last_checkpoint_that_holds_pickled_code(reviews_csv, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}, "epoch": 0, "x": Payload(marker)}, run / "checkpoints/last.ckpt")
    cfg = compose_cfg([*tiny_text_overrides(reviews_csv, tmp_path), f"resume={run}"], run)
    with pytest.raises(ModelLoadError) as caught:
        train(cfg)
    message = str(caught.value)
    assert "last.ckpt holds objects other than tensors" in message and "\n" not in message
    assert not marker.exists() and not (run / "metrics.json").exists()


def _build(cfg):
    backbone = instantiate(cfg.model.backbone)
    datamodule = instantiate(cfg.data, preprocessing=backbone.preprocessing)
    datamodule.setup("fit")
    module = build_module(cfg, backbone, 2, datamodule.label_names, task=datamodule.task)
    return module, datamodule


def test_cache_files_that_hold_pickled_code_are_never_unpickled_but_recomputed(reviews_csv, tmp_path, caplog):
    cfg = compose_cfg([*tiny_text_overrides(reviews_csv, tmp_path), "finetune=head_only"], tmp_path / "run")
    cache = Path(cfg.paths.cache_dir)
    torch.manual_seed(0)
    module, datamodule = _build(cfg)
    first = maybe_cache_features(module, datamodule, 3, str(cache))
    tokens = sorted((cache / "tokens").glob("*.npz"))  # one per split
    [features] = (cache / "features").glob("*.pt")
    good_ids = [np.load(path)["input_ids"] for path in tokens]
    good_features = first.features["train"].features.clone()

    marker = tmp_path / "pwned"
    for path in tokens:
        with path.open("wb") as f:
            np.savez(f, input_ids=np.array([Payload(marker)], dtype=object))
    torch.save({"train": Payload(marker)}, features)
    with caplog.at_level(logging.WARNING, logger="ftlab"):
        torch.manual_seed(0)
        module, datamodule = _build(cfg)  # reads the token cache
        again = maybe_cache_features(module, datamodule, 3, str(cache))  # reads the feature cache
    assert not marker.exists()
    assert caplog.text.count("could not be read as plain data") == len(tokens) + 1
    assert all(str(path) in caplog.text for path in [*tokens, features])
    assert all(np.array_equal(np.load(p)["input_ids"], ids) for p, ids in zip(tokens, good_ids, strict=True))
    assert torch.equal(again.features["train"].features, good_features)
    assert torch.load(features, weights_only=True)["train"][0].shape == good_features.shape
