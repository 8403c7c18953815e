"""``ftlab-export``: a run's checkpoint as a deployable file, checked against the checkpoint by running it.

    ftlab-export run=<run folder> format=onnx          # model.onnx: dynamic batch and sequence axes, output "logits"
    ftlab-export run=<run folder> format=pt2           # model.pt2: torch.export.load(...).module()(input_ids, ...)
    ftlab-export run=<run folder> format=hf            # save_pretrained folder for AutoModelForSequenceClassification
    ftlab-export run=<run folder> compress=int8        # ONNX Runtime dynamic int8: accuracy, size, latency
    ftlab-export run=<run folder> compress=prune prune.fraction=0.5 [prune.finetune_epochs=1]

Writes into ``<run>/export/<format>/`` (``<run>/export/<int8|prune>/`` with ``compress``), never over the run's
own files. PEFT adapters are merged into the backbone first. Each written file is loaded back with its own runtime
(transformers / ``torch.export.load`` / onnxruntime) and run on real test examples; the largest absolute logit
difference from the checkpoint is reported and must be within ``tolerance``. ``export.json`` records the check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ftlab.deploy import compress as compression
from ftlab.deploy import formats
from ftlab.runs import rebuild
from ftlab.utils.errors import ConfigError, FtlabError
from ftlab.utils.safe_files import write_json


class ExportCheckError(FtlabError, RuntimeError):
    """A written model's outputs differ from the checkpoint's by more than the tolerance."""


def merge_adapters(module: Any) -> Any:
    """Merge PEFT adapters (LoRA, IA3) into the backbone weights, when the run has them."""
    try:
        from ftlab.finetuning.adapters import is_peft, merge_peft
    except ImportError:  # no PEFT support in this ftlab: a run cannot hold adapters
        return module
    return merge_peft(module) if is_peft(module.backbone) else module


def _trim(batch: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    """``rows`` of a batch, text padded only to their own longest sequence."""
    part = {k: v[rows] for k, v in batch.items()}
    if "attention_mask" in part:
        width = int(part["attention_mask"].sum(1).max())
        # token inputs (B, T) and per-token labels (B, T) long; not multi-hot labels (B, C) float
        per_token = {
            k for k, v in part.items() if v.ndim == 2 and (k != "labels" or not v.is_floating_point())
        }
        part = {k: v[:, :width] if k in per_token else v for k, v in part.items()}
    return part


def example_batches(run: rebuild.LoadedRun, count: int) -> list[dict[str, torch.Tensor]]:
    """Two batches of real test examples: the first ``count``, and the last few of them with their own padding
    (a different batch size and sequence length, so a file with a frozen shape fails the check)."""
    if count < 2:
        raise ConfigError(f"verify_examples={count} must be at least 2.")
    datamodule = rebuild.datamodule_for(run)
    loader = datamodule.test_dataloader()
    first = _trim(next(iter(loader)), slice(0, count))
    size = len(first["labels"])
    return [first, _trim(first, slice(size - max(1, min(3, size - 1)), size))]


def export_format(cfg: DictConfig, run: rebuild.LoadedRun) -> dict[str, Any]:
    out = Path(cfg.output_dir).expanduser() if cfg.get("output_dir") else run.run_dir / "export" / cfg.format
    batches = example_batches(run, int(cfg.verify_examples))
    module = merge_adapters(run.module).eval()
    with torch.no_grad():
        expected = [module(b) for b in batches]
    got = formats.export(
        cfg.format,
        module,
        batches,
        out,
        label_names=run.label_names,
        max_length=int(run.cfg.data.get("max_length", 512)),
    )
    diff = formats.max_abs_diff(expected, got)
    task = module.task  # decoded predictions compared the task's way (argmax, thresholds, tags)
    same_labels = all(
        task.same_predictions(e, torch.as_tensor(g)) for e, g in zip(expected, got, strict=True)
    )
    record = {
        "format": cfg.format,
        "output": str(out),
        "checkpoint": str(run.ckpt_path),
        "inputs": formats.input_names(batches[0]),
        "label_names": run.label_names,
        "examples_checked": sum(len(b["labels"]) for b in batches),
        "max_abs_diff": diff,
        "tolerance": float(cfg.tolerance),
        "same_labels": same_labels,
    }
    write_json(out / "export.json", record)
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(
        f"\nftlab export: {cfg.format} -> {out}\n  files            {files}\n  examples checked {record['examples_checked']}"
        f"\n  max |Δlogit|     {diff:.2e} (tolerance {cfg.tolerance:.0e})\n  same labels      {same_labels}\n",
        flush=True,
    )
    if not diff <= float(cfg.tolerance):
        raise ExportCheckError(
            f"The {cfg.format} export in {out} differs from the checkpoint by {diff:.3g} (max |Δlogit|), more than "
            f"tolerance={cfg.tolerance}. Do not ship it; a larger tolerance=... accepts it if the difference is "
            "expected (e.g. float rounding of a very deep model)."
        )
    return record


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export (``format``) or compress (``compress``) ``cfg.run``'s checkpoint; returns the check's record."""
    run = rebuild.load_run(cfg.run, cfg.get("ckpt"))
    if cfg.get("compress"):
        return compression.compress(cfg, run, merge_adapters)
    return export_format(cfg, run)


def main() -> None:
    """``python -m ftlab.export``, the same as ``ftlab-export``: ftlab.cli checks the config first."""
    from ftlab import cli

    cli.export()


if __name__ == "__main__":
    main()
