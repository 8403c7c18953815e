"""Compression: dynamic int8 quantization and global magnitude pruning, measured against the original.

Each variant is saved as TorchScript (``original.pt``, ``int8.pt`` / ``pruned.pt``: self-contained, loadable with
``torch.jit.load`` without ftlab) and measured on the run's test split: accuracy, file size (raw, and gzip, which
is where the zeros of a pruned model pay off: unstructured sparsity does not shrink a dense tensor), and the CPU
latency of one batch. The table is printed as Markdown and written to ``compression.md`` and ``compression.json``.
"""

from __future__ import annotations

import copy
import gzip
import json
import logging
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn.utils import prune

from ftlab.deploy.formats import LogitsModel, input_names
from ftlab.runs import rebuild
from ftlab.utils.errors import ConfigError

log = logging.getLogger(__name__)

METHODS = ("int8", "prune")


def quantize_int8(module: nn.Module) -> nn.Module:
    """Linear layers with int8 weights and dynamically quantized activations (CPU inference)."""
    return torch.ao.quantization.quantize_dynamic(copy.deepcopy(module), {nn.Linear}, dtype=torch.qint8)


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


def save_torchscript(module: nn.Module, batch: dict[str, torch.Tensor], path: Path) -> None:
    names = input_names(batch)
    with torch.no_grad():
        traced = torch.jit.trace(
            LogitsModel(module, names).eval(), tuple(batch[n] for n in names), strict=False, check_trace=False
        )
    torch.jit.save(traced, str(path))


def file_sizes(path: Path) -> tuple[float, float]:
    """Size in MB, raw and gzip-compressed."""
    gz = path.with_suffix(path.suffix + ".gz")
    with path.open("rb") as src, gzip.open(gz, "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst)
    sizes = path.stat().st_size / 1e6, gz.stat().st_size / 1e6
    gz.unlink()
    return sizes


def latencies_ms(models: list[nn.Module], batch: dict[str, torch.Tensor], repeats: int) -> list[float]:
    """Median wall time of one forward pass on ``batch`` per model (CPU). The models take turns, pass by pass, so
    a slow spell of a shared machine hits all of them alike rather than whichever was measured then."""
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for i in range(repeats + 3):  # three warm-up rounds
            for model, record in zip(models, times, strict=True):
                start = time.perf_counter()
                model(batch)
                if i >= 3:
                    record.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def accuracy(module: nn.Module, loader: Any) -> float:
    correct = total = 0
    for batch, logits in rebuild.batches(module, loader, torch.device("cpu")):
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
        trainer.fit(module, train_dataloaders=datamodule.train_dataloader())

    return finetune


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
    if run.module.regression:
        raise ConfigError(
            "compress= reports test accuracy, so it needs a classification run (this one regresses)."
        )
    if cfg.device != "cpu":
        raise ConfigError("compress= measures CPU inference (int8 kernels are CPU-only): leave device=cpu.")
    out = Path(cfg.output_dir).expanduser() if cfg.get("output_dir") else run.run_dir / "export" / method
    out.mkdir(parents=True, exist_ok=True)
    datamodule = rebuild.datamodule_for(run)
    original = merge(run.module).eval()
    sparsity = 0.0
    if method == "int8":
        variant = quantize_int8(original)
    else:
        epochs = int(cfg.prune.finetune_epochs)
        variant, sparsity = magnitude_prune(
            original, float(cfg.prune.fraction), _finetuner(run, datamodule, epochs)
        )
    bench = next(iter(datamodule.test_dataloader()))
    bench = {k: v[: int(cfg.benchmark.batch_size)] for k, v in bench.items()}
    rows = []
    timings = latencies_ms([original, variant], bench, int(cfg.benchmark.repeats))
    for (name, model, zeros), latency in zip(
        (("original", original, 0.0), (method, variant, sparsity)), timings, strict=True
    ):
        path = out / f"{name}.pt"
        save_torchscript(model, bench, path)
        size, gz = file_sizes(path)
        rows.append(
            {
                "model": name,
                "file": str(path),
                "accuracy": accuracy(model, datamodule.test_dataloader()),
                "size_mb": size,
                "gzip_mb": gz,
                "latency_ms": latency,
                "sparsity": zeros,
            }
        )
    table = markdown(rows)
    record = {
        "method": method,
        "checkpoint": str(run.ckpt_path),
        "prune": dict(cfg.prune) if method == "prune" else None,
        "benchmark": {**dict(cfg.benchmark), "threads": torch.get_num_threads()},
        "rows": rows,
    }
    (out / "compression.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "compression.md").write_text(table + "\n")
    print(f"\nftlab export: compress={method} -> {out}\n\n{table}\n", flush=True)
    return record
