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
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, ListConfig

from ftlab.data.sources import FILE_FORMATS, read_table
from ftlab.data.unreadable import report_skipped, skipping, utf8_lines
from ftlab.evaluate import pick_device
from ftlab.runs import rebuild
from ftlab.tasks import GenerativeTask
from ftlab.utils.errors import ConfigError, DataError, DataFileError
from ftlab.utils.safe_files import write_frame, write_text

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
TABLE_SUFFIXES = tuple(FILE_FORMATS)


def _image_files(path: Path) -> list[str]:
    files = (
        sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
    )
    if not files:
        raise DataFileError(f"inputs={path}: the folder holds no image files ({', '.join(IMAGE_SUFFIXES)}).")
    return [str(p) for p in files]


def _text_lines(path: Path) -> list[str]:
    """The non-blank lines of a text file; a line that is not UTF-8 is skipped (inside ``unreadable.skipping``)."""
    return [line for _, line in utf8_lines(path.read_bytes(), path) if line.strip()]


def read_inputs(cfg: DictConfig, run: rebuild.LoadedRun, modality: str) -> tuple[list[str], list[str] | None]:
    """The examples (texts or image paths, as the data module's ``modality`` says) and, for pairs, the second texts.

    Inside ``ftlab.data.unreadable.skipping`` lines of a text file or table that are not UTF-8 are left out and
    recorded; outside, the first one is refused.
    """
    images = modality == "image"
    inputs = cfg.inputs
    if isinstance(inputs, ListConfig | list | tuple):
        if images:
            return [p for item in inputs for p in _image_files(Path(str(item)).expanduser())], None
        return [str(x) for x in inputs], None
    path = Path(str(inputs)).expanduser()
    if not path.exists():
        raise DataFileError(
            f"inputs={inputs!r}: no such file or folder. Give a .txt file (one example per line), a table "
            f'({", ".join(TABLE_SUFFIXES)}), image files or a folder, or strings as a list: inputs=\'["a","b"]\'.'
        )
    if images:
        return _image_files(path), None
    data = run.cfg.data
    pair_column = cfg.get("pair_column") or data.get("text_pair_column")
    if path.suffix.lower() == ".txt":
        if pair_column:
            raise ConfigError(
                f"The run classifies text pairs ({pair_column}); a .txt file gives single texts. Give a table with "
                "both columns (column=..., pair_column=...)."
            )
        return _text_lines(path), None
    table = read_table(path, "inputs")
    column = cfg.get("column") or data.get("text_column") or "text"
    for key, name in (("column", column), ("pair_column", pair_column)):
        if name and name not in table.columns:
            raise DataError(
                f"{key}={name!r} is not a column of {path}; its columns are: {', '.join(map(str, table.columns))}."
            )
    texts = table[column].astype(str).tolist()
    return texts, table[pair_column].astype(str).tolist() if pair_column else None


def predict_rows(
    run: rebuild.LoadedRun,
    datamodule: Any,
    examples: list[str],
    pairs: list[str] | None,
    batch_size: int,
    top_k: int,
    device: torch.device,
    skipped: list[tuple[str, str]] | None = None,
    generation: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Encoded by the run's data module exactly as training encoded its examples, decoded by the run's task.

    ``skipped``: an example the data module cannot encode (an unreadable image) is left out and recorded there as
    (input, reason); without it the first such example raises. A generative task (causal_lm) generates instead,
    with ``generation`` (``max_new_tokens``, ``temperature``).
    """
    module = run.module.to(device).eval()
    collate = datamodule.collator(cuda=device.type == "cuda")
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            items = _encode(datamodule, chunk, pairs[start : start + batch_size] if pairs else None, skipped)
            if items:
                batch = {k: v.to(device) for k, v in collate(items).items()}
                if isinstance(module.task, GenerativeTask):
                    rows += module.task.generate_rows(module, batch, items, **(generation or {}))
                    continue
                rows += module.task.decode(module(batch).float().cpu(), items, top_k)
    return rows


def _encode(
    datamodule: Any, chunk: list[str], pairs: list[str] | None, skipped: list[tuple[str, str]] | None
) -> list[dict[str, Any]]:
    """``datamodule.encode(chunk)``; when one example fails and ``skipped`` is given, each alone, bad ones left out."""
    try:
        return datamodule.encode(chunk, pairs)
    except DataError:
        if skipped is None:
            raise
    items = []
    for i, example in enumerate(chunk):
        try:
            items += datamodule.encode([example], [pairs[i]] if pairs else None)
        except DataError as err:
            skipped.append((str(example)[:200], str(err)))
    return items


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".jsonl":
        write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
        return
    if path.suffix.lower() != ".csv":
        raise ConfigError(f"output={path}: the suffix must be .csv or .jsonl.")
    flat = []
    for row in rows:  # CSV: top-k as top1_label, top1_probability, top2_label, ...
        extra = {}
        for k, item in enumerate(row.get("top_k", []), start=1):
            extra.update({f"top{k}_label": item["label"], f"top{k}_probability": item["probability"]})
        # label sets, tags and entity spans as JSON in their cell
        plain = {
            k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in row.items() if k != "top_k"
        }
        flat.append({**plain, **extra})
    write_frame(path, pd.DataFrame(flat), index=False)


def _shown(row: dict[str, Any]) -> str:
    """A row's prediction in a few characters for the console."""
    if "label" in row:
        return f"{row['label']:<12} {row['probability']:.3f}"
    if "value" in row:
        return f"{row['value']:.4f}"
    if "response" in row:
        return repr(row["response"])[:40]
    return json.dumps({k: v for k, v in row.items() if k != "input"})[:40]


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Predict ``cfg.inputs`` with ``cfg.run``'s checkpoint; returns the output path and the number of rows."""
    if int(cfg.top_k) < 1 or int(cfg.batch_size) < 1:
        raise ConfigError(f"top_k={cfg.top_k} and batch_size={cfg.batch_size} must be at least 1.")
    device = pick_device(cfg.device)
    run = rebuild.load_run(cfg.run, cfg.get("ckpt"))
    datamodule = rebuild.datamodule_for(run, setup=False)  # its preprocessing only: no training data is read
    with skipping() as skipped:  # (input, reason): reported, the others predicted, exit status 2
        examples, pairs = read_inputs(cfg, run, datamodule.modality)
    if not examples and not skipped:
        raise DataError(f"inputs={cfg.inputs}: there is nothing to predict (no non-empty example).")
    torch.manual_seed(int(cfg.get("seed") or 0))  # sampled generations (temperature > 0) repeat
    generation = {
        "max_new_tokens": cfg.get("max_new_tokens"),
        "temperature": float(cfg.get("temperature") or 0),
    }
    rows = predict_rows(
        run, datamodule, examples, pairs, int(cfg.batch_size), int(cfg.top_k), device, skipped, generation
    )
    output = (
        Path(cfg.output).expanduser()
        if cfg.get("output")
        else run.run_dir / "predictions" / "predictions.csv"
    )
    write_rows(rows, output)
    for row in rows[:10]:
        print(f"  {_shown(row)}  {str(row['input'])[:70]}")
    print(f"\nftlab predict: {len(rows)} predictions written to {output}\n", flush=True)
    if skipped:  # <output>.skipped.csv (input, reason), and one paragraph naming them (exit status 2)
        record = output.with_name(output.stem + ".skipped.csv")
        raise report_skipped(skipped, record, f"{len(rows)} predicted (written to {output})")
    return {"output": str(output), "examples": len(rows)}


def main() -> None:
    """``python -m ftlab.predict``, the same as ``ftlab-predict``: ftlab.cli checks the config first."""
    from ftlab import cli

    cli.predict()


if __name__ == "__main__":
    main()
