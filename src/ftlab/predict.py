"""``ftlab-predict``: labels and probabilities for raw inputs, with the run's own tokenizer or image transform.

    ftlab-predict run=<run folder> inputs=reviews.txt                   # one example per line
    ftlab-predict run=<run folder> inputs=table.csv column=text         # a column of a CSV/TSV/JSONL/Parquet table
    ftlab-predict run=<run folder> inputs='["great film","awful"]'      # strings on the command line
    ftlab-predict run=<image run> inputs=photos/                        # image files or a folder of them

Writes one row per input (``input``, ``label``, ``probability`` and the top-k labels with their probabilities) to
``output`` (``.csv`` or ``.jsonl``; default ``<run>/predictions/predictions.csv``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, ListConfig

from ftlab.data.sources import FILE_FORMATS, read_table
from ftlab.evaluate import pick_device
from ftlab.runs import folder, rebuild
from ftlab.utils.errors import ConfigError, DataError, DataFileError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
TABLE_SUFFIXES = tuple(FILE_FORMATS)


def is_image_run(run: rebuild.LoadedRun) -> bool:
    return hasattr(run.module.backbone.preprocessing, "input_size")


def _image_files(path: Path) -> list[str]:
    files = (
        sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
    )
    if not files:
        raise DataFileError(f"inputs={path}: the folder holds no image files ({', '.join(IMAGE_SUFFIXES)}).")
    return [str(p) for p in files]


def read_inputs(cfg: DictConfig, run: rebuild.LoadedRun) -> tuple[list[str], list[str] | None]:
    """The examples (texts or image paths) and, for pair tasks, the second texts."""
    inputs = cfg.inputs
    if isinstance(inputs, ListConfig | list | tuple):
        if is_image_run(run):
            return [p for item in inputs for p in _image_files(Path(str(item)).expanduser())], None
        return [str(x) for x in inputs], None
    path = Path(str(inputs)).expanduser()
    if not path.exists():
        raise DataFileError(
            f"inputs={inputs!r}: no such file or folder. Give a .txt file (one example per line), a table "
            f'({", ".join(TABLE_SUFFIXES)}), image files or a folder, or strings as a list: inputs=\'["a","b"]\'.'
        )
    if is_image_run(run):
        return _image_files(path), None
    data = run.cfg.data
    pair_column = cfg.get("pair_column") or data.get("text_pair_column")
    if path.suffix.lower() == ".txt":
        if pair_column:
            raise ConfigError(
                f"The run classifies text pairs ({pair_column}); a .txt file gives single texts. Give a table with "
                "both columns (column=..., pair_column=...)."
            )
        return [line for line in path.read_text().splitlines() if line.strip()], None
    table = read_table(path, "inputs")
    column = cfg.get("column") or data.get("text_column") or "text"
    for key, name in (("column", column), ("pair_column", pair_column)):
        if name and name not in table.columns:
            raise DataError(
                f"{key}={name!r} is not a column of {path}; its columns are: {', '.join(map(str, table.columns))}."
            )
    texts = table[column].astype(str).tolist()
    return texts, table[pair_column].astype(str).tolist() if pair_column else None


def text_batches(
    run: rebuild.LoadedRun, texts: list[str], pairs: list[str] | None, batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenized as in training: the run's tokenizer, truncation at ``data.max_length``, padding per batch."""
    from ftlab.data.text import load_tokenizer

    preprocessing: Any = run.module.backbone.preprocessing
    tokenizer = load_tokenizer(preprocessing.tokenizer)
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            texts[start : start + batch_size],
            pairs[start : start + batch_size] if pairs else None,
            truncation=True,
            max_length=int(run.cfg.data.max_length),
            padding=True,
            return_token_type_ids=pairs is not None,
            return_tensors="pt",
        )
        yield dict(encoded)


def image_batches(
    run: rebuild.LoadedRun, paths: list[str], batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Read and transformed as the run's validation/test images (no augmentation)."""
    from ftlab.data.image import ImageDataset, build_transform

    preprocessing: Any = run.module.backbone.preprocessing
    transform = build_transform(preprocessing, "none", train=False)
    dataset = ImageDataset(np.asarray(paths, dtype=object), np.zeros(len(paths), dtype=np.int64), transform)
    for start in range(0, len(paths), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(paths)))]
        yield {"pixel_values": torch.stack([item["pixel_values"] for item in items])}


def prediction_rows(
    inputs: list[str], logits: torch.Tensor, names: list[str] | None, top_k: int
) -> list[dict[str, Any]]:
    """One row per input: the label, its probability and the top-k labels/probabilities (value for regression)."""
    if logits.ndim == 1:  # regression
        return [{"input": x, "value": float(v)} for x, v in zip(inputs, logits.tolist(), strict=True)]
    names = names or [str(i) for i in range(logits.shape[-1])]
    probs = logits.float().softmax(-1)
    top_p, top_i = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    rows = []
    for x, p_row, i_row in zip(inputs, top_p.tolist(), top_i.tolist(), strict=True):
        rows.append(
            {
                "input": x,
                "label": names[i_row[0]],
                "probability": p_row[0],
                "top_k": [{"label": names[i], "probability": p} for i, p in zip(i_row, p_row, strict=True)],
            }
        )
    return rows


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return
    if path.suffix.lower() != ".csv":
        raise ConfigError(f"output={path}: the suffix must be .csv or .jsonl.")
    flat = []
    for row in rows:  # CSV: top-k as top1_label, top1_probability, top2_label, ...
        extra = {}
        for k, item in enumerate(row.get("top_k", []), start=1):
            extra.update({f"top{k}_label": item["label"], f"top{k}_probability": item["probability"]})
        flat.append({**{k: v for k, v in row.items() if k != "top_k"}, **extra})
    pd.DataFrame(flat).to_csv(path, index=False)


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Predict ``cfg.inputs`` with ``cfg.run``'s checkpoint; returns the output path and the number of rows."""
    if int(cfg.top_k) < 1 or int(cfg.batch_size) < 1:
        raise ConfigError(f"top_k={cfg.top_k} and batch_size={cfg.batch_size} must be at least 1.")
    device = pick_device(cfg.device)
    run = rebuild.load_run(cfg.run, cfg.get("ckpt"))
    examples, pairs = read_inputs(cfg, run)
    if not examples:
        raise DataError(f"inputs={cfg.inputs}: there is nothing to predict (no non-empty example).")
    if is_image_run(run):
        loader = image_batches(run, examples, int(cfg.batch_size))
    else:
        loader = text_batches(run, examples, pairs, int(cfg.batch_size))
    module = run.module.to(device)
    logits = torch.cat([out.float().cpu() for _, out in rebuild.batches(module, loader, device)])
    rows = prediction_rows(examples, logits, run.label_names, int(cfg.top_k))
    output = (
        Path(cfg.output).expanduser()
        if cfg.get("output")
        else run.run_dir / "predictions" / "predictions.csv"
    )
    write_rows(rows, output)
    for row in rows[:10]:
        shown = f"{row['label']:<12} {row['probability']:.3f}" if "label" in row else f"{row['value']:.4f}"
        print(f"  {shown}  {row['input'][:70]}")
    print(f"\nftlab predict: {len(rows)} predictions written to {output}\n", flush=True)
    return {"output": str(output), "examples": len(rows)}


@hydra.main(version_base="1.3", config_path=folder.CONF_DIR, config_name="predict")
def _hydra_main(cfg: DictConfig) -> None:
    folder.exit_on_user_error(predict, cfg)


def main() -> None:
    """Console entry point (``ftlab-predict``)."""
    _hydra_main()


if __name__ == "__main__":
    main()
