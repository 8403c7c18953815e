"""Exports and compression checked by the test itself: each written file is run with its own runtime here
(onnxruntime, ``torch.export.load``, transformers) on fixed inputs and compared with the in-memory module's logits;
compressed models' accuracy is computed here and compared with the original model's. Nothing is taken from the
``export.json`` / ``compression.json`` that ``ftlab-export`` writes about itself, except to check that it is true.

Tolerances: float32 exports differ from eager PyTorch only by operation order and fused kernels (measured here:
ONNX ~2e-7, pt2 0, HF ~1e-6 with the CLS-pooling rewrite), so 1e-4 on logits of magnitude ~1-5 leaves a wide
margin while any real fault (a wrong weight, a lost attention mask, dropout left on) moves logits by 1e-2 or more.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from ftlab.export import export
from ftlab.runs import rebuild
from ftlab.train import train
from ftlab.utils.errors import ConfigError

from conftest import CONF_DIR, compose_cfg, tiny_reviews, tiny_text_overrides

TOLERANCE = 1e-4
LONG = "a wonderful moving film with great acting a clever plot and a warm funny heart from start to end " * 3
TEXTS = [
    ["a wonderful, moving film", "boring and far too long", "superb", "nothing works here", "funny"],
    ["dull"],
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """tiny BERT (CLS pooling, so format=hf applies), 3 epochs on 200 short reviews: 20 test examples."""
    tmp = tmp_path_factory.mktemp("parity")
    csv = tmp / "reviews.csv"
    tiny_reviews(100).to_csv(csv, index=False)
    overrides = tiny_text_overrides(csv, tmp) + ["trainer.max_epochs=3", "model.backbone.pooling=cls"]
    cfg = compose_cfg(overrides, tmp / "run")
    train(cfg)
    (tmp / "run" / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp / "run" / ".hydra" / "config.yaml")  # what a Hydra run writes
    return tmp / "run"


@pytest.fixture(scope="module")
def loaded(run_dir) -> rebuild.LoadedRun:
    return rebuild.load_run(run_dir)


def export_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="export", overrides=overrides)


def fixed_batches(run: rebuild.LoadedRun) -> list[dict[str, torch.Tensor]]:
    """Tokenized here with the HF tokenizer: 5 texts, 1 text (batch size 1), and 2 texts of 48 tokens, far longer
    than the 16 tokens of training and of the batches ftlab-export traced with (dynamic axes)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run.module.backbone.preprocessing.tokenizer)
    out = []
    for texts, length in ((TEXTS[0], 16), (TEXTS[1], 16), ([LONG, "superb"], 48)):
        enc = tokenizer(texts, padding=True, truncation=True, max_length=length, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    assert out[2]["input_ids"].shape == (2, 48)
    return out


def logits_of(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(b) for b in batches]


def assert_close(expected: list[torch.Tensor], got: list[torch.Tensor], tolerance: float = TOLERANCE) -> None:
    for e, g in zip(expected, got, strict=True):
        g = torch.as_tensor(g)
        assert g.shape == e.shape
        assert float((g - e).abs().max()) <= tolerance, (e, g)
        assert torch.equal(g.argmax(-1), e.argmax(-1))


def onnx_logits(path: Path, batches: list[dict[str, torch.Tensor]]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return [session.run(["logits"], {n: b[n].numpy() for n in names})[0] for b in batches]


def test_onnx_file_matches_the_module_with_dynamic_batch_and_sequence(run_dir, loaded, tmp_path):
    record = export(export_cfg([f"run={run_dir}", "format=onnx", f"output_dir={tmp_path}"]))
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    assert [o.name for o in graph.output] == ["logits"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.json", "model.onnx"]  # weights inside
    batches = fixed_batches(loaded)
    assert_close(logits_of(loaded.module, batches), onnx_logits(tmp_path / "model.onnx", batches))
    assert record["max_abs_diff"] <= TOLERANCE and record["same_labels"]  # the report agrees with what we saw


def test_pt2_program_matches_the_module_after_torch_export_load(run_dir, loaded, tmp_path):
    record = export(export_cfg([f"run={run_dir}", "format=pt2", f"output_dir={tmp_path}"]))
    program = torch.export.load(tmp_path / "model.pt2").module()
    batches = fixed_batches(loaded)
    with torch.no_grad():
        got = [program(b["input_ids"], b["attention_mask"]) for b in batches]
    assert_close(logits_of(loaded.module, batches), got, tolerance=1e-5)  # same kernels as eager: measured 0
    assert record["inputs"] == ["input_ids", "attention_mask"] and record["same_labels"]


def test_hf_folder_matches_the_module_when_loaded_by_transformers(run_dir, loaded, tmp_path):
    from transformers import AutoModelForSequenceClassification

    export(export_cfg([f"run={run_dir}", "format=hf", f"output_dir={tmp_path}"]))
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float32).eval()
    batches = fixed_batches(loaded)
    with torch.no_grad():
        got = [model(**b).logits for b in batches]
    # CLS pooling is written as pooler = 1e-3 * I, classifier / 1e-3: tanh's curvature costs ~(1e-3 h)^2 / 3
    assert_close(logits_of(loaded.module, batches), got)


def test_torchscript_is_replaced_by_pt2_with_a_clear_error(run_dir, tmp_path):
    with pytest.raises(ConfigError, match="format=torchscript .*replaced by format=pt2"):
        export(export_cfg([f"run={run_dir}", "format=torchscript", f"output_dir={tmp_path}"]))
    assert not tmp_path.joinpath("model.pt").exists()


def test_exports_raise_no_deprecation_or_future_warning_and_keep_the_console_quiet(run_dir, tmp_path, caplog):
    """The exporters and the int8 path ftlab calls are PyTorch's and ONNX Runtime's current ones; the ONNX graph
    optimizer's per-rewrite INFO lines and ONNX Runtime's pre-processing advice stay out of the console."""
    caplog.set_level(logging.INFO)
    runs = [["format=onnx"], ["format=pt2"], ["format=hf"], ["compress=int8", "benchmark.repeats=1"]]
    for i, args in enumerate(runs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            export(export_cfg([f"run={run_dir}", *args, f"output_dir={tmp_path / str(i)}"]))
        deprecated = [
            f"{w.category.__name__} {w.filename}:{w.lineno}: {w.message}"
            for w in caught
            if issubclass(w.category, DeprecationWarning | FutureWarning)
        ]
        assert deprecated == [], (args, deprecated)
    noise = [
        r.getMessage() for r in caplog.records if r.name.split(".")[0] in ("onnxscript", "onnx_ir", "root")
    ]
    assert noise == []


def split_batches(run: rebuild.LoadedRun) -> list[dict[str, torch.Tensor]]:
    """The run's test split, batched as ftlab batches it (the examples compression is measured on)."""
    return list(rebuild.datamodule_for(run).test_dataloader())


def accuracy_of(run: rebuild.LoadedRun, model: nn.Module) -> float:
    batches = split_batches(run)
    logits = logits_of(model, batches)
    hits = sum(int((lg.argmax(-1) == b["labels"]).sum()) for lg, b in zip(logits, batches, strict=True))
    return hits / sum(len(b["labels"]) for b in batches)


def test_the_fixture_run_learnt_the_task(loaded):
    """Accuracy comparisons below mean something only far above chance (0.5)."""
    assert accuracy_of(loaded, loaded.module) >= 0.9


def onnx_accuracy(run: rebuild.LoadedRun, path: Path) -> tuple[float, list[np.ndarray]]:
    batches = split_batches(run)
    logits = onnx_logits(path, batches)
    hits = sum(
        int((lg.argmax(-1) == b["labels"].numpy()).sum()) for lg, b in zip(logits, batches, strict=True)
    )
    return hits / sum(len(b["labels"]) for b in batches), logits


def test_int8_keeps_accuracy_within_one_example_and_shrinks_the_file(run_dir, loaded, tmp_path):
    record = export(
        export_cfg([f"run={run_dir}", "compress=int8", f"output_dir={tmp_path}", "benchmark.repeats=2"])
    )
    original, int8 = record["rows"]
    reference = accuracy_of(loaded, loaded.module)
    float_acc, float_logits = onnx_accuracy(loaded, tmp_path / "original.onnx")
    int8_acc, int8_logits = onnx_accuracy(loaded, tmp_path / "int8.onnx")
    assert float_acc == reference and original["accuracy"] == pytest.approx(float_acc)
    assert int8["accuracy"] == pytest.approx(int8_acc)
    # stated drop: at most one of the 20 test examples (0.05); int8 moves tiny BERT logits by ~1e-2, so a larger
    # drop means a broken quantization, not an unlucky example
    assert int8_acc >= reference - 0.05, (int8_acc, reference)
    # int8 really is int8: different logits from the float file, but close to them
    diff = max(float(np.abs(a - b).max()) for a, b in zip(int8_logits, float_logits, strict=True))
    assert 0 < diff < 0.25, diff
    assert int8["size_mb"] < 0.5 * original["size_mb"]  # weights and embedding tables stored as int8
    assert int8["latency_ms"] > 0 and original["latency_ms"] > 0
    assert (tmp_path / "compression.md").read_text().startswith("| model | test acc")


def magnitude_pruned(module: nn.Module, fraction: float) -> nn.Module:
    """The oracle: zero the ``fraction`` smallest |w| over all Linear weights together (one global threshold)."""
    import copy

    pruned = copy.deepcopy(module)
    weights = [m.weight for m in pruned.modules() if isinstance(m, nn.Linear)]
    flat = torch.cat([w.detach().abs().flatten() for w in weights])
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[torch.topk(flat, round(fraction * flat.numel()), largest=False).indices] = False
    with torch.no_grad():
        for w, mask in zip(weights, keep.split([w.numel() for w in weights]), strict=True):
            w.mul_(mask.reshape(w.shape))
    return pruned.eval()


def test_pruned_file_is_the_globally_pruned_module(run_dir, loaded, tmp_path):
    record = export(
        export_cfg([f"run={run_dir}", "compress=prune", f"output_dir={tmp_path}", "benchmark.repeats=2"])
    )
    _, pruned_row = record["rows"]
    oracle = magnitude_pruned(loaded.module, 0.5)
    batches = fixed_batches(loaded)
    assert_close(logits_of(oracle, batches), onnx_logits(tmp_path / "prune.onnx", batches))
    linears = [m.weight for m in oracle.modules() if isinstance(m, nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in linears) / sum(w.numel() for w in linears)
    assert pruned_row["sparsity"] == pytest.approx(zeros, abs=1e-6) and zeros == pytest.approx(0.5, abs=1e-3)
    accuracy, _ = onnx_accuracy(loaded, tmp_path / "prune.onnx")
    assert pruned_row["accuracy"] == pytest.approx(accuracy) == accuracy_of(loaded, oracle)
    assert pruned_row["gzip_mb"] < record["rows"][0]["gzip_mb"]  # the zeros compress


def test_pruning_with_a_short_finetune_keeps_the_zeros_and_the_accuracy(run_dir, loaded, tmp_path):
    cfg = export_cfg(
        [
            f"run={run_dir}",
            "compress=prune",
            "prune.fraction=0.7",
            "prune.finetune_epochs=1",
            f"output_dir={tmp_path}",
        ]
    )
    variant = export(cfg)["rows"][1]
    # the written file holds the zeros after fine-tuning: its Linear matrices (float 2-D, not embeddings)
    arrays = {
        t.name: onnx.numpy_helper.to_array(t)
        for t in onnx.load(str(tmp_path / "prune.onnx")).graph.initializer
    }
    linear = [a for n, a in arrays.items() if a.dtype == np.float32 and a.ndim == 2 and "embeddings" not in n]
    zeros = sum(int((a == 0).sum()) for a in linear) / sum(a.size for a in linear)
    assert variant["sparsity"] == pytest.approx(0.7, abs=0.01) and zeros == pytest.approx(0.7, abs=0.01)
    accuracy, _ = onnx_accuracy(loaded, tmp_path / "prune.onnx")
    # chance is 0.5; the fixture's model scores >= 0.9 and the fine-tune must keep it there despite 70% zeros
    assert variant["accuracy"] == pytest.approx(accuracy) and accuracy >= 0.9
    json.loads((tmp_path / "compression.json").read_text())  # a valid record
