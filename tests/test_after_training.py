"""After training: eval reproduces the run's metrics, predict matches the module, the HF folder outside ftlab.

One tiny run (tiny BERT, CLS pooling so that the HF export applies) is trained once for the whole module. Export
parity and compression, checked against the module by the tests themselves: tests/test_export_parity.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from ftlab.data.text import PadCollator, load_tokenizer, tokenize_cached
from ftlab.deploy import formats
from ftlab.evaluate import evaluate
from ftlab.export import ExportCheckError, export
from ftlab.predict import predict
from ftlab.runs import rebuild
from ftlab.train import train
from ftlab.utils.errors import ConfigError, DataFileError, ModelLoadError

from conftest import CONF_DIR, compose_cfg, read_json, run_cli, tiny_reviews, tiny_text_overrides

TEXTS = [
    "a wonderful, moving film",
    "boring and far too long",
    "superb",
    "nothing works here",
    "funny and warm",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("after")
    csv = tmp / "reviews.csv"
    tiny_reviews().to_csv(csv, index=False)
    overrides = tiny_text_overrides(csv, tmp) + ["trainer.max_epochs=3", "model.backbone.pooling=cls"]
    cfg = compose_cfg(overrides, tmp / "run")
    train(cfg)
    (tmp / "run" / ".hydra").mkdir()
    OmegaConf.save(
        cfg, tmp / "run" / ".hydra" / "config.yaml"
    )  # what a Hydra run writes; train() alone does not
    return tmp / "run"


def entry_cfg(name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def module_logits(run_dir: Path, texts: list[str]) -> tuple[torch.Tensor, list[str]]:
    """The in-memory module's logits and label names, with the training data path's own tokenization and padding."""
    run = rebuild.load_run(run_dir)
    tokenizer = load_tokenizer(run.module.backbone.preprocessing.tokenizer)
    arrays = tokenize_cached(tokenizer, texts, None, int(run.cfg.data.max_length), None)
    items = [
        {"input_ids": arrays["input_ids"][a:b], "labels": 0}
        for a, b in zip(arrays["offsets"][:-1], arrays["offsets"][1:], strict=True)
    ]
    with torch.no_grad():
        return run.module(PadCollator(tokenizer.pad_token_id)(items)), run.label_names


def module_labels(run_dir: Path, texts: list[str]) -> list[str]:
    logits, names = module_logits(run_dir, texts)
    return [names[i] for i in logits.argmax(-1).tolist()]


def test_eval_reproduces_the_test_metrics_of_training(run_dir):
    recorded = read_json(run_dir / "metrics.json")
    before = (run_dir / "metrics.json").stat().st_mtime_ns
    metrics = evaluate(entry_cfg("eval", [f"run={run_dir}", "split=test"]))
    for key in ("test/acc", "test/f1", "test/precision", "test/recall", "test/loss"):
        assert metrics[key] == pytest.approx(recorded[key], abs=1e-6), key
    out = run_dir / "eval" / "test"
    assert read_json(out / "metrics.json")["test/acc"] == metrics["test/acc"]
    report = pd.read_csv(out / "per_class.csv")
    assert report["label"].tolist() == ["neg", "pos"] and report["support"].sum() == metrics["examples"]
    matrix = pd.read_csv(out / "confusion_matrix.csv", index_col=0)
    assert np.trace(matrix.to_numpy()) == round(metrics["test/acc"] * metrics["examples"])
    assert (out / "confusion_matrix.png").stat().st_size > 1000
    assert (run_dir / "metrics.json").stat().st_mtime_ns == before  # the training record is untouched


def test_eval_cli_on_another_split(run_dir, tmp_path):
    proc = run_cli("evaluate", [f"run={run_dir}", "split=validation"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation/f1_micro" in proc.stdout and "precision" in proc.stdout
    assert read_json(run_dir / "eval" / "validation" / "metrics.json")["examples"] == 8
    assert not list(tmp_path.iterdir())  # nothing written into the working directory
    bad = run_cli("evaluate", [f"run={tmp_path}"], cwd=tmp_path)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_predict_matches_the_module_on_strings_text_files_and_tables(run_dir, tmp_path):
    logits, names = module_logits(run_dir, TEXTS)
    probabilities = logits.softmax(-1)  # the module's own, computed here: predict must report the same
    expected = module_labels(run_dir, TEXTS)
    (tmp_path / "in.txt").write_text("\n".join(TEXTS[:2]) + "\n\n" + "\n".join(TEXTS[2:]) + "\n")
    pd.DataFrame({"body": TEXTS, "id": range(5)}).to_json(tmp_path / "in.jsonl", orient="records", lines=True)
    cases = {
        "list.csv": ["inputs=" + json.dumps(TEXTS)],
        "txt.jsonl": [f"inputs={tmp_path / 'in.txt'}"],
        "table.csv": [f"inputs={tmp_path / 'in.jsonl'}", "column=body"],
    }
    for name, args in cases.items():
        out = tmp_path / name
        result = predict(
            entry_cfg("predict", [f"run={run_dir}", f"output={out}", "top_k=2", "batch_size=2", *args])
        )
        rows = (
            pd.read_csv(out).to_dict("records")
            if out.suffix == ".csv"
            else [json.loads(line) for line in out.read_text().splitlines()]
        )
        assert result["examples"] == 5 and [r["input"] for r in rows] == TEXTS, name
        assert [r["label"] for r in rows] == expected, name
        for r, p in zip(rows, probabilities.tolist(), strict=True):
            top = (
                r["top_k"]
                if "top_k" in r
                else [
                    {"label": r["top1_label"], "probability": r["top1_probability"]},
                    {"label": r["top2_label"], "probability": r["top2_probability"]},
                ]
            )
            # batch_size=2 pads differently from the one batch above: equal up to float rounding
            assert [t["probability"] for t in top] == pytest.approx(sorted(p, reverse=True), abs=1e-5), name
            assert [t["label"] for t in top] == sorted(names, key=lambda n: -p[names.index(n)]), name
            assert r["probability"] == pytest.approx(max(p), abs=1e-5), name


def test_predict_errors_name_the_input(run_dir, tmp_path):
    with pytest.raises(DataFileError, match="no such file or folder"):
        predict(entry_cfg("predict", [f"run={run_dir}", f"inputs={tmp_path / 'missing.txt'}"]))
    pd.DataFrame({"body": TEXTS}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ValueError, match="column='review' is not a column"):
        predict(entry_cfg("predict", [f"run={run_dir}", f"inputs={tmp_path / 't.csv'}"]))


def test_a_checkpoint_from_another_config_is_refused(run_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(run_dir / ".hydra", other / ".hydra")
    cfg = yaml.safe_load((other / ".hydra" / "config.yaml").read_text())
    cfg["model"]["backbone"]["config_overrides"]["num_hidden_layers"] = 1
    (other / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"unexpected \(16\): backbone.model.encoder.layer.1"):
        rebuild.load_run(other, run_dir / "checkpoints" / "best.ckpt")


def test_checkpoints_load_weights_only(run_dir, tmp_path):
    checkpoint = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["evil"] = Path(
        "/"
    )  # any non-allow-listed object: its pickle would run code
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        rebuild.load_run(run_dir, tmp_path / "evil.ckpt")


HF_SCRIPT = """
import json, sys
from transformers import AutoModelForSequenceClassification, AutoTokenizer
folder, texts = sys.argv[1], json.loads(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
logits = model(**tokenizer(texts, padding=True, truncation=True, return_tensors="pt")).logits
assert not any(name.startswith("ftlab") for name in sys.modules)
print(json.dumps([model.config.id2label[i] for i in logits.argmax(-1).tolist()]))
"""


def test_hf_folder_loads_with_plain_transformers_and_predicts_the_same_labels(run_dir, tmp_path):
    out = tmp_path / "hf"
    export(entry_cfg("export", [f"run={run_dir}", "format=hf", f"output_dir={out}"]))
    assert read_json(out / "config.json")["id2label"] == {"0": "neg", "1": "pos"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(HF_SCRIPT), str(out), json.dumps(TEXTS)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={
            "HF_HUB_OFFLINE": "1",
            "PATH": "/usr/bin:/bin",
        },  # no PYTHONPATH: ftlab cannot be imported by accident
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == module_labels(run_dir, TEXTS)


def test_hf_export_refuses_what_it_cannot_express_and_checks_tolerance(run_dir, tmp_path):
    run = rebuild.load_run(run_dir)
    run.module.backbone.pooling = "mean"
    with pytest.raises(ConfigError, match="mean pooling cannot be written"):
        formats.export_hf(run.module, [], tmp_path, label_names=None, max_length=16)
    cfg = entry_cfg(
        "export", [f"run={run_dir}", "format=hf", f"output_dir={tmp_path / 'hf'}", "tolerance=1e-12"]
    )
    with pytest.raises(ExportCheckError, match="more than tolerance=1e-12"):
        export(cfg)


def hf_logits(folder: Path, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**batch).logits


def test_hf_export_of_pooler_pooling_is_exact(tmp_path, reviews_csv):
    cfg = compose_cfg(tiny_text_overrides(reviews_csv, tmp_path) + ["model.backbone.pooling=pooler"])
    from hydra.utils import instantiate

    torch.manual_seed(0)
    module = rebuild.build_module(cfg, instantiate(cfg.model.backbone), 3, ["a", "b", "c"]).eval()
    batch = {"input_ids": torch.tensor([[101, 2307, 102, 0], [101, 2307, 2143, 102]])}
    batch["attention_mask"] = (batch["input_ids"] > 0).long()
    with torch.no_grad():
        expected = module(batch)
    formats.export_hf(module, [batch], tmp_path / "hf", label_names=["a", "b", "c"], max_length=16)
    with torch.no_grad():  # the folder as transformers alone loads it
        got = hf_logits(tmp_path / "hf", batch)
    assert float((got - expected).abs().max()) < 1e-5  # pooler pooling is BERT's own: float rounding only


def test_a_lora_run_exports_with_the_adapters_merged(tmp_path, reviews_csv):
    overrides = tiny_text_overrides(reviews_csv, tmp_path) + [
        "finetune=lora",
        "model.backbone.pooling=cls",
        "trainer.max_epochs=1",
    ]
    cfg = compose_cfg(overrides, tmp_path / "run")
    train(cfg)
    (tmp_path / "run" / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / "run" / ".hydra" / "config.yaml")
    state = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # the adapters learnt something to merge
    export(entry_cfg("export", [f"run={tmp_path / 'run'}", "format=hf", f"output_dir={tmp_path / 'hf'}"]))
    lora = rebuild.load_run(tmp_path / "run").module  # adapters unmerged, as trained
    batch = {"input_ids": torch.tensor([[101, 2307, 2143, 102, 0], [101, 2307, 2143, 999, 102]])}
    batch["attention_mask"] = (batch["input_ids"] > 0).long()
    with torch.no_grad():
        expected, got = lora(batch), hf_logits(tmp_path / "hf", batch)
    # merged weights (W + BA) and the CLS rewrite of the HF folder: float rounding, ~1e-6 measured
    assert float((got - expected).abs().max()) <= 1e-4 and torch.equal(got.argmax(-1), expected.argmax(-1))
    from safetensors.torch import load_file

    names = load_file(tmp_path / "hf" / "model.safetensors").keys()
    assert not any("lora" in n for n in names) and "classifier.weight" in names
