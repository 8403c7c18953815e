"""What is served: a run folder's checkpoint (PyTorch) or an exported ONNX file, and what the server tells about it.

An ONNX file holds the network only: no tokenizer, no image transform, no label names, no decoding. ``export=``
therefore leads back to the run the file was exported from (``export.json`` / ``compression.json`` record the
checkpoint, inside ``<run>/checkpoints/``): the run's data module encodes the inputs and the run's task decodes the
logits, exactly as for ``run=``; only the forward pass runs in ONNX Runtime. Nothing here imports torch: the server
process reads the folders, the inference workers load the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ftlab.runs import folder
from ftlab.utils.errors import ConfigError, DataFileError

EXPORT_RECORDS = ("export.json", "compression.json")  # what ftlab-export format=onnx / compress= write


@dataclass
class Source:
    """The run folder (preprocessing, task, labels), its checkpoint, and the ONNX file when one is served."""

    run_dir: Path
    ckpt: Path | None = None
    onnx: Path | None = None
    export_record: dict[str, Any] = field(default_factory=dict)

    @property
    def runtime(self) -> str:
        return "onnxruntime" if self.onnx else "pytorch"


def _run_of(ckpt: Path, record_path: Path) -> Path:
    """The run folder that holds ``ckpt`` (the nearest parent with ``.hydra/config.yaml``)."""
    for parent in ckpt.parents:
        if (parent / folder.CONFIG_FILE).is_file():
            return parent
    raise DataFileError(
        f"{record_path} names the checkpoint {ckpt}, which is not inside a run folder (no {folder.CONFIG_FILE} "
        "above it). The export needs its run for the tokenizer / image transform and the labels: serve it from "
        "the run's own export/ folder, or give run=<run folder> as well."
    )


def from_export(export_dir: Path, run: str | None, model_file: str | None) -> Source:
    """``export=<folder>``: its ONNX file, and the run named by its ``export.json`` (or ``compression.json``)."""
    records = [export_dir / name for name in EXPORT_RECORDS if (export_dir / name).is_file()]
    if not records:
        raise DataFileError(
            f"export={export_dir}: no {' or '.join(EXPORT_RECORDS)} in it. Give the folder ftlab-export wrote "
            "(<run>/export/onnx after format=onnx, <run>/export/int8 after compress=int8)."
        )
    record = json.loads(records[0].read_text())
    if record.get("format", "onnx") != "onnx":
        raise ConfigError(f"export={export_dir} holds a format={record['format']} export; serve an ONNX one.")
    default = "model.onnx" if records[0].name == "export.json" else f"{record.get('method', 'int8')}.onnx"
    onnx = export_dir / (model_file or default)
    if not onnx.is_file():
        found = ", ".join(sorted(p.name for p in export_dir.glob("*.onnx"))) or "none"
        raise DataFileError(
            f"export={export_dir}: no {onnx.name} (ONNX files there: {found}); pick one with model_file=."
        )
    ckpt = Path(record["checkpoint"])
    run_dir = Path(run).expanduser().resolve() if run else _run_of(ckpt, records[0])
    return Source(run_dir, ckpt if ckpt.is_file() else None, onnx, record)


def resolve(cfg: DictConfig) -> Source:
    """The source of ``ftlab-serve``'s config: ``run=`` (PyTorch) or ``export=`` (ONNX Runtime)."""
    run, export = cfg.get("run"), cfg.get("export")
    if not run and not export:
        raise ConfigError(
            "ftlab-serve needs run=<run folder> (the checkpoint, through PyTorch) or export=<ONNX export folder> "
            "(through ONNX Runtime)."
        )
    if export:
        source = from_export(Path(str(export)).expanduser().resolve(), run, cfg.get("model_file"))
    else:
        source = Source(Path(str(run)).expanduser().resolve(), Path(cfg.ckpt) if cfg.get("ckpt") else None)
    if not (source.run_dir / folder.CONFIG_FILE).is_file():
        raise DataFileError(
            f"run={source.run_dir}: {folder.CONFIG_FILE} does not exist. Give the folder of a finished ftlab run."
        )
    return source


def metadata(source: Source, run_cfg: DictConfig) -> dict[str, Any]:
    """``GET /metadata``: task, labels, model, runtime and the run's test metrics (from its ``metrics.json``)."""
    labels_path, metrics_path = source.run_dir / folder.LABELS_FILE, source.run_dir / folder.METRICS_FILE
    labels = json.loads(labels_path.read_text()) if labels_path.is_file() else {}
    recorded = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    backbone = run_cfg.model.backbone
    return {
        "task": labels.get("task") or recorded.get("task") or run_cfg.data.get("task", "classification"),
        "labels": labels.get("names"),
        "model": {
            "backbone": str(backbone.get("_target_", "")).rsplit(".", 1)[-1],
            "name": backbone.get("name_or_path") or backbone.get("arch") or backbone.get("name"),
        },
        "runtime": source.runtime,
        "run": str(source.run_dir),
        "checkpoint": str(source.ckpt) if source.ckpt else None,
        "onnx": str(source.onnx) if source.onnx else None,
        "test_metrics": {k: v for k, v in recorded.items() if k.startswith("test/")},
    }
