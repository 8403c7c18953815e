"""After training, image runs: eval, predict on image files, export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from ftlab.evaluate import evaluate
from ftlab.export import export
from ftlab.predict import predict
from ftlab.runs import rebuild
from ftlab.train import train
from ftlab.utils.errors import ConfigError

from conftest import CONF_DIR, read_json


def entry_cfg(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("image_after")
    overrides = [
        "data=digits",
        "model=tiny_resnet",
        "model.backbone.input_size=16",
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        f"paths.cache_dir={tmp}/cache",
        "callbacks.progress_bar.kind=log",
    ]
    cfg = entry_cfg("train", overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp / "run")
    train(cfg)
    (tmp / "run" / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp / "run" / ".hydra" / "config.yaml")  # what a Hydra run writes
    return tmp / "run"


def test_image_eval_reproduces_training_and_predict_matches_the_module(image_run, tmp_path):
    recorded = read_json(image_run / "metrics.json")
    metrics = evaluate(entry_cfg("eval", [f"run={image_run}"]))
    assert metrics["test/acc"] == pytest.approx(recorded["test/acc"], abs=1e-6)
    assert metrics["test/loss"] == pytest.approx(recorded["test/loss"], abs=1e-5)

    run = rebuild.load_run(image_run)
    dataset = rebuild.datamodule_for(run).datasets["test"]
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):  # PNG is lossless: the files hold exactly the test images
        Image.fromarray(np.asarray(dataset.images[i]).squeeze()).save(folder / f"{i:02d}.png")
    with torch.no_grad():
        logits = run.module({"pixel_values": torch.stack([dataset[i]["pixel_values"] for i in range(6)])})
    expected = [run.label_names[i] for i in logits.argmax(-1).tolist()]
    out = tmp_path / "preds.csv"
    predict(entry_cfg("predict", [f"run={image_run}", f"inputs={folder}", f"output={out}"]))
    assert pd.read_csv(out)["label"].astype(str).tolist() == expected


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_image_exports_match_the_module_and_hf_is_refused(image_run, tmp_path, fmt):
    """The written file, run here with its own runtime on test images (batch sizes 5 and 1: a dynamic batch axis),
    against the module's logits: within 1e-4 (float rounding of fused kernels; a real fault moves logits ~1e-2)."""
    record = export(entry_cfg("export", [f"run={image_run}", f"format={fmt}", f"output_dir={tmp_path}"]))
    assert record["inputs"] == ["pixel_values"]
    run = rebuild.load_run(image_run)
    dataset = rebuild.datamodule_for(run).datasets["test"]
    batches = [torch.stack([dataset[i]["pixel_values"] for i in rows]) for rows in (range(10, 15), [20])]
    with torch.no_grad():
        expected = [run.module({"pixel_values": x}) for x in batches]
        if fmt == "onnx":
            import onnxruntime as ort

            session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
            got = [torch.from_numpy(session.run(["logits"], {"pixel_values": x.numpy()})[0]) for x in batches]
        else:
            program = torch.export.load(tmp_path / "model.pt2").module()
            got = [program(x) for x in batches]
    for e, g in zip(expected, got, strict=True):
        assert g.shape == e.shape and float((g - e).abs().max()) <= 1e-4
        assert torch.equal(g.argmax(-1), e.argmax(-1))
    with pytest.raises(ConfigError, match="format=hf exports HF text models"):
        export(entry_cfg("export", [f"run={image_run}", "format=hf", f"output_dir={tmp_path / 'hf'}"]))
