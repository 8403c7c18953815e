"""Compression: dynamic int8 quantization and global magnitude pruning, measured against the original.

The original and the variant are written as ONNX files (``original.onnx``, ``int8.onnx`` / ``prune.onnx``:
self-contained, run with onnxruntime without ftlab or torch) and measured with onnxruntime on the run's test split:
accuracy, file size (raw, and gzip, which is where the zeros of a pruned model pay off: unstructured sparsity does
not shrink a dense tensor), and the CPU latency of one batch. int8 is ONNX Runtime's dynamic quantization of the
exported model (``onnxruntime.quantization.quantize_dynamic``: int8 weights for MatMul and the embedding Gather,
activations quantized on the fly), which replaced ``torch.ao.quantization.quantize_dynamic`` (deprecated in
PyTorch). The table is printed as Markdown and written to ``compression.md`` and ``compression.json``.
"""

from __future__ import annotations

import copy
import gzip
import logging
import shutil
import statistics
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn.utils import prune

from ftlab.deploy import formats
from ftlab.runs import rebuild
from ftlab.utils.errors import ConfigError
from ftlab.utils.safe_files import write_json, write_text

log = logging.getLogger(__name__)

METHODS = ("int8", "prune")


def quantize_int8(original: Path, path: Path) -> None:
    """ONNX Runtime dynamic quantization of an ONNX file: int8 weights, activations quantized per batch (CPU)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # it logs on the root logger that pre-processing (symbolic shape inference) may help; that pre-processing fails
    # on dynamo-exported BERT ("Incomplete symbolic shape inference"), so the advice is noise here
    with formats.quiet_loggers(("",), logging.ERROR):
        quantize_dynamic(original, path, weight_type=QuantType.QInt8)


def _linear_weights(module: nn.Module) -> list[tuple[Any, str]]:
    return [(m, "weight") for m in module.modules() if isinstance(m, nn.Linear)]


def magnitude_prune(
    module: nn.Module, fraction: float, finetune: Callable[[nn.Module], None] | None = None
) -> tuple[nn.Module, float]:
    """Zero the ``fraction`` of all Linear weights with the smallest magnitude (one global threshold), optionally
    fine-tune with the masks in place, then make the zeros permanent; returns the model and its Linear sparsity."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"prune.fraction={fraction} must be between 0 and 1 (exclusive).")
    pruned = copy.deepcopy(module)
    targets: list[tuple[Any, str]] = _linear_weights(pruned)
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=fraction)
    if finetune is not None:
        finetune(pruned)  # the masks stay applied while training: pruned weights stay zero
    for m, name in targets:
        prune.remove(m, name)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in targets)
    return pruned.eval(), zeros / sum(m.weight.numel() for m, _ in targets)


def file_sizes(path: Path) -> tuple[float, float]:
    """Size in MB, raw and gzip-compressed."""
    gz = path.with_suffix(path.suffix + ".gz")
    with path.open("rb") as src, gzip.open(gz, "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst)
    sizes = path.stat().st_size / 1e6, gz.stat().st_size / 1e6
    gz.unlink()
    return sizes


def latencies_ms(
    runners: list[Callable[[Any], Any]], batch: dict[str, torch.Tensor], repeats: int
) -> list[float]:
    """Median wall time of one forward pass on ``batch`` per runner (CPU). The runners take turns, pass by pass,
    so a slow spell of a shared machine hits all of them alike rather than whichever was measured then."""
    times: list[list[float]] = [[] for _ in runners]
    for i in range(repeats + 3):  # three warm-up rounds
        for run, record in zip(runners, times, strict=True):
            start = time.perf_counter()
            run(batch)
            if i >= 3:
                record.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def accuracy(session: Any, loader: Any) -> float:
    """Test accuracy of an ONNX model (argmax of its logits)."""
    correct = total = 0
    for batch in loader:
        logits = formats.run_onnx(session, batch)
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
        total += len(batch["labels"])
    return correct / total


def _finetuner(run: rebuild.LoadedRun, datamodule: Any, epochs: int) -> Callable[[nn.Module], None] | None:
    if epochs <= 0:
        return None

    def finetune(module: Any) -> None:
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        module.train()
        with warnings.catch_warnings():  # a fixed number of epochs, no validation: by design, not a slip
            warnings.filterwarnings(
                "ignore", message=r"You defined a `validation_step` but have no `val_dataloader`"
            )
            trainer.fit(module, train_dataloaders=datamodule.train_dataloader())

    return finetune


def write_models(
    cfg: DictConfig, run: rebuild.LoadedRun, original: nn.Module, datamodule: Any, bench: Any, out: Path
) -> tuple[dict[str, Path], float]:
    """``original.onnx`` and ``<method>.onnx`` in ``out``; returns them and the variant's Linear sparsity."""
    method = cfg.compress
    files = {"original": out / "original.onnx", method: out / f"{method}.onnx"}
    formats.save_onnx(original, bench, files["original"])
    if method == "int8":
        quantize_int8(files["original"], files[method])
        return files, 0.0
    finetune = _finetuner(run, datamodule, int(cfg.prune.finetune_epochs))
    variant, sparsity = magnitude_prune(original, float(cfg.prune.fraction), finetune)
    formats.save_onnx(variant, bench, files[method])
    return files, sparsity


def measure(
    files: dict[str, Path], bench: dict[str, torch.Tensor], test_loader: Callable[[], Any], repeats: int
) -> list[dict[str, Any]]:
    """One row per ONNX file: test accuracy, size, gzip size and latency, all with onnxruntime."""
    sessions = [formats.onnx_session(path) for path in files.values()]
    timings = latencies_ms([partial(formats.run_onnx, session) for session in sessions], bench, repeats)
    rows = []
    for (name, path), session, latency in zip(files.items(), sessions, timings, strict=True):
        size, gz = file_sizes(path)
        row = {"model": name, "file": str(path), "accuracy": accuracy(session, test_loader())}
        rows.append({**row, "size_mb": size, "gzip_mb": gz, "latency_ms": latency, "sparsity": 0.0})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| model | test acc | Δ acc | size MB | gzip MB | latency ms | speed-up | Linear sparsity |"
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    base = rows[0]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['accuracy']:.4f} | {r['accuracy'] - base['accuracy']:+.4f} | {r['size_mb']:.2f} | "
            f"{r['gzip_mb']:.2f} | {r['latency_ms']:.1f} | {base['latency_ms'] / r['latency_ms']:.2f}x | "
            f"{r['sparsity']:.2f} |"
        )
    return "\n".join(lines)


def compress(
    cfg: DictConfig, run: rebuild.LoadedRun, merge: Callable[[nn.Module], nn.Module]
) -> dict[str, Any]:
    """Build the ``cfg.compress`` variant of the run's model and measure it against the original."""
    method = cfg.compress
    if method not in METHODS:
        raise ConfigError(
            f"compress={method!r} is not one of {', '.join(METHODS)} (or null for no compression)."
        )
    if run.module.task.name != "classification":
        raise ConfigError(
            "compress= reports test accuracy, so it needs a classification run (this one is "
            f"data.task={run.module.task.name})."
        )
    if cfg.device != "cpu":
        raise ConfigError("compress= measures CPU inference (int8 kernels are CPU-only): leave device=cpu.")
    out = Path(cfg.output_dir).expanduser() if cfg.get("output_dir") else run.run_dir / "export" / method
    out.mkdir(parents=True, exist_ok=True)
    datamodule = rebuild.datamodule_for(run)
    bench = next(iter(datamodule.test_dataloader()))
    bench = {k: v[: int(cfg.benchmark.batch_size)] for k, v in bench.items()}
    files, sparsity = write_models(cfg, run, merge(run.module).eval(), datamodule, bench, out)
    rows = measure(files, bench, datamodule.test_dataloader, int(cfg.benchmark.repeats))
    rows[1]["sparsity"] = sparsity
    table = markdown(rows)
    record = {
        "method": method,
        "checkpoint": str(run.ckpt_path),
        "prune": dict(cfg.prune) if method == "prune" else None,
        "benchmark": {**dict(cfg.benchmark), "threads": torch.get_num_threads(), "runtime": "onnxruntime"},
        "rows": rows,
    }
    write_json(out / "compression.json", record)
    write_text(out / "compression.md", table + "\n")
    print(f"\nftlab export: compress={method} -> {out}\n\n{table}\n", flush=True)
    return record
