"""Untrusted files and hostile inputs (issue 18, points 4 and 5).

Files with a pickle payload (it would create a marker file when unpickled) in the places ftlab loads from that
tests/test_checkpoint_safety.py does not cover: a run's ``last.ckpt`` on resume, the token cache and the feature
cache. Then prediction and evaluation on junk texts and images.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict
from PIL import Image

from ftlab.data.image_files import ImageReadError, read_image
from ftlab.evaluate import evaluate
from ftlab.finetuning.feature_cache import maybe_cache_features
from ftlab.predict import predict
from ftlab.runs.rebuild import build_module
from ftlab.train import train
from ftlab.utils.errors import DataError, ModelLoadError

from conftest import CONF_DIR, compose_cfg, run_cli, tiny_text_overrides


class Payload:
    """Unpickling this creates ``marker`` (``builtins.open``): what a malicious file would do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_resume_refuses_a_last_checkpoint_that_holds_pickled_code(reviews_csv, tmp_path):
    probe = tmp_path / "probe"
    pickle.loads(
        pickle.dumps(Payload(probe))
    ).close()  # the payload is live: unpickled, it creates its marker
    assert probe.exists()
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


def _entry(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def _trained(tmp: Path, overrides: list[str]) -> Path:
    limits = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
              "trainer.limit_test_batches=1", "trainer.num_sanity_val_steps=0"]  # fmt: skip
    cfg = _entry("train", [*overrides, *limits, f"paths.cache_dir={tmp}/cache"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp / "run")
    train(cfg)
    (tmp / "run" / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp / "run" / ".hydra" / "config.yaml")  # what a Hydra run writes
    return tmp / "run"


def test_predict_on_hostile_texts_skips_only_the_line_that_is_not_utf8(reviews_csv, tmp_path):
    run = _trained(tmp_path, tiny_text_overrides(reviews_csv, tmp_path))
    lines = [
        b"a wonderful film",
        b"nul\x00bytes\x00inside",
        "\u05e1\u05e8\u05d8 \u05e0\u05e4\u05dc\u05d0 \u0641\u064a\u0644\u0645 \u0631\u0627\u0626\u0639".encode(),  # RTL
        b"caf\xe9 latin-1, not UTF-8",  # line 4
        "\U0001f600\U0001f3ac\U0001f44d\u200d great".encode(),  # emoji, zero-width joiner
        ("long " * 210_000).encode(),  # about 1 MB
    ]
    inputs = tmp_path / "inputs.txt"
    inputs.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "preds.jsonl"
    with pytest.raises(DataError) as caught:
        predict(_entry("predict", [f"run={run}", f"inputs={inputs}", f"output={out}"]))
    assert f"{inputs} line 4: not valid UTF-8 (byte 0xe9 at column 4)" in str(caught.value)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert (
        len(rows) == 5 and rows[1]["input"] == "nul\x00bytes\x00inside" and len(rows[4]["input"]) > 1_000_000
    )
    assert all(r["label"] in ("neg", "pos") and 0.5 <= r["probability"] <= 1 for r in rows)
    assert pd.read_csv(tmp_path / "preds.skipped.csv")["input"].tolist() == [f"{inputs}:4"]

    # nothing skipped: no error (exit status 0); an empty string is an example like any other
    result = predict(_entry("predict", [f"run={run}", 'inputs=["", "funny and warm"]', f"output={out}"]))
    assert result["examples"] == 2 and len(out.read_text().splitlines()) == 2

    # ftlab-eval on a table with a line that is not UTF-8: that line named and skipped, the other rows evaluated
    table = tmp_path / "test.csv"
    rows = [
        b"review,stars",
        b"funny and warm,pos",
        b"caf\xe9 dull,neg",
        b"a dull lifeless mess,neg",
        b"superb,pos",
    ]
    table.write_bytes(b"\n".join(rows) + b"\n")
    evaluated = tmp_path / "eval"
    with pytest.raises(DataError) as caught:
        evaluate(_entry("eval", [f"run={run}", f"+data.test_file={table}", f"output_dir={evaluated}"]))
    assert "1 input(s) were skipped and 3 evaluated" in str(caught.value)
    assert f"{table} line 3: not valid UTF-8 (byte 0xe9 at column 4)" in str(caught.value)
    assert json.loads((evaluated / "metrics.json").read_text())["examples"] == 3
    assert pd.read_csv(evaluated / "skipped.csv")["input"].tolist() == [f"{table}:3"]


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A valid 1x1 PNG whose header says ``width`` x ``height`` (a decompression bomb, 70 bytes on disk)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    start = data.index(b"IHDR")
    data[start + 4 : start + 12] = struct.pack(">II", width, height)
    data[start + 17 : start + 21] = struct.pack(">I", zlib.crc32(bytes(data[start : start + 17])))
    path.write_bytes(bytes(data))


def _hostile_images(folder: Path) -> None:
    folder.mkdir()
    ramp = np.linspace(0, 65535, 24 * 24).reshape(24, 24).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "a_16bit.png")
    Image.new("CMYK", (20, 20), (0, 200, 200, 0)).save(folder / "b_cmyk.jpg")
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    palette.save(folder / "c_palette.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (30, 10), (200, 10, 10)).save(folder / "d_exif.jpg", exif=exif)
    frames = [Image.new("P", (16, 16), i) for i in (3, 7)]
    frames[0].save(folder / "e_animated.gif", save_all=True, append_images=frames[1:], duration=50)
    Image.new("RGB", (1, 1), (9, 9, 9)).save(folder / "f_1x1.png")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(folder / "g_truncated.png")
    whole = (folder / "g_truncated.png").read_bytes()
    (folder / "g_truncated.png").write_bytes(whole[: len(whole) // 2])
    _png_claiming(folder / "h_bomb.png", 20_000, 20_000)


def test_image_files_from_the_wild_are_read_upright_as_8_bit_and_the_bad_ones_named(tmp_path):
    folder = tmp_path / "images"
    _hostile_images(folder)
    assert read_image(folder / "a_16bit.png").dtype == torch.uint8
    assert read_image(folder / "a_16bit.png").max() == 255  # the 16-bit range scaled, not clipped
    assert read_image(folder / "d_exif.jpg").shape[1:] == (30, 10)  # stored 30 wide, shown upright: 10 wide
    assert read_image(folder / "c_palette.png").shape[0] == 4  # transparency kept as alpha (dropped later)
    assert read_image(folder / "e_animated.gif").shape[1:] == (16, 16)
    with pytest.raises(ImageReadError, match="h_bomb.png was not read.*decompression bomb"):
        read_image(folder / "h_bomb.png")
    with pytest.raises(ImageReadError, match="g_truncated.png cannot be read"):
        read_image(folder / "g_truncated.png")
    assert (folder / "h_bomb.png").stat().st_size < 100


def test_predict_cli_on_hostile_images_predicts_the_rest_and_exits_2(tmp_path):
    run = _trained(tmp_path, ["data=digits", "model=tiny_resnet", "model.backbone.input_size=16",
                              "trainer.accelerator=cpu", "trainer.devices=1", "callbacks.progress_bar.kind=log"])  # fmt: skip
    folder = tmp_path / "images"
    _hostile_images(folder)
    out = tmp_path / "preds.csv"
    proc = run_cli("predict", [f"run={run}", f"inputs={folder}", f"output={out}"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "2 input(s) were skipped and 6 predicted" in proc.stderr and "Traceback" not in proc.stderr
    rows = pd.read_csv(out)
    assert [Path(p).name for p in rows["input"]] == [
        "a_16bit.png", "b_cmyk.jpg", "c_palette.png", "d_exif.jpg", "e_animated.gif", "f_1x1.png"
    ]  # fmt: skip
    assert rows["label"].astype(str).isin([str(d) for d in range(10)]).all()
    skipped = pd.read_csv(tmp_path / "preds.skipped.csv")
    assert [Path(p).name for p in skipped["input"]] == ["g_truncated.png", "h_bomb.png"]
    assert "cut off" in skipped["reason"][0] and "decompression bomb" in skipped["reason"][1]


def test_eval_on_hostile_images_evaluates_the_rest_and_names_the_skipped(tmp_path):
    rng = np.random.default_rng(0)

    def draw(folder: Path, colour: tuple[int, int, int], n: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            noise = rng.integers(0, 40, (20, 20, 3))
            Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(
                folder / f"{i}.png"
            )

    for name, colour in (("a", (200, 20, 20)), ("b", (20, 20, 200))):
        draw(tmp_path / "train" / name, colour, 10)
    run = _trained(tmp_path, ["data=image_folder", f"data.root={tmp_path / 'train'}", "data.num_workers=0",
                              "model=tiny_resnet", "model.backbone.input_size=16", "trainer.accelerator=cpu",
                              "trainer.devices=1", "callbacks.progress_bar.kind=log"])  # fmt: skip
    test = tmp_path / "test"
    test.mkdir()
    _hostile_images(test / "a")  # 8 files, 2 of them unreadable
    draw(test / "b", (20, 20, 200), 2)
    out = tmp_path / "eval"
    with pytest.raises(DataError) as caught:  # the CLI prints it and exits 2
        evaluate(_entry("eval", [f"run={run}", f"+data.test_root={test}", f"output_dir={out}"]))
    assert "2 input(s) were skipped and 8 evaluated" in str(caught.value)
    assert json.loads((out / "metrics.json").read_text())["examples"] == 8
    assert (out / "per_class.csv").is_file() and (out / "confusion_matrix.png").is_file()
    skipped = pd.read_csv(out / "skipped.csv")
    assert [Path(p).name for p in skipped["input"]] == ["g_truncated.png", "h_bomb.png"]
    assert "cut off" in skipped["reason"][0] and "decompression bomb" in skipped["reason"][1]
    first = json.loads((out / "metrics.json").read_text())

    # under attack the same two are left out of the clean and of the attacked pass, and named the same way
    attacked = tmp_path / "attacked"
    with pytest.raises(DataError) as caught:
        evaluate(_entry("eval", [f"run={run}", f"+data.test_root={test}", f"output_dir={attacked}",
                                 "attack=fgsm", "attack.epsilon=[0.1]"]))  # fmt: skip
    assert "2 input(s) were skipped and 8 evaluated" in str(caught.value)
    record = json.loads((attacked / "metrics.json").read_text())
    assert (
        record["examples"] == 8 and record["test/acc"] == first["test/acc"] and "fgsm@0.1/test/acc" in record
    )
    skipped = pd.read_csv(attacked / "skipped.csv")
    assert [Path(p).name for p in skipped["input"]] == ["g_truncated.png", "h_bomb.png"]

    # the unreadable files removed: no error, no stale record, the same metrics (the rest was evaluated as such)
    for bad in ("g_truncated.png", "h_bomb.png"):
        (test / "a" / bad).unlink()
    again = evaluate(_entry("eval", [f"run={run}", f"+data.test_root={test}", f"output_dir={out}"]))
    assert not (out / "skipped.csv").exists()
    assert {k: v for k, v in again.items() if k.startswith("test/")} == {
        k: v for k, v in first.items() if k.startswith("test/")
    }


def test_token_files_lose_only_the_sentence_with_a_line_that_is_not_utf8_under_eval(tmp_path):
    from ftlab.data.token_sources import read_token_file
    from ftlab.data.unreadable import skipping

    conll = tmp_path / "tags.conll"
    conll.write_bytes(b"Obama\tB-person\nspoke\tO\n\nin\tO\nPar\xe9s\tB-geo-loc\n\nthen\tO\nleft\tO\n")
    with skipping() as skipped:
        sentences = read_token_file(str(conll), "test_file", "tokens", "tags")
    assert sentences == [(["Obama", "spoke"], ["B-person", "O"]), (["then", "left"], ["O", "O"])]
    assert [item for item, _ in skipped] == [f"{conll}:5"] and "line 5: not valid UTF-8" in skipped[0][1]
    with pytest.raises(DataError, match="line 5: not valid UTF-8"):  # training: refused, named
        read_token_file(str(conll), "train_file", "tokens", "tags")

    jsonl = tmp_path / "tags.jsonl"
    jsonl.write_bytes(b'{"tokens": ["a"], "tags": ["O"]}\n{"tokens": ["\xe9"], "tags": ["O"]}\n')
    with skipping() as skipped:
        assert read_token_file(str(jsonl), "test_file", "tokens", "tags") == [(["a"], ["O"])]
    assert [item for item, _ in skipped] == [f"{jsonl}:2"]
