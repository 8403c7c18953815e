"""Writing files so that a kill never leaves half of one, reading caches as data only, and full disks in words.

- :func:`atomic_write`: every file ftlab writes goes to a temporary name in the same folder and is renamed over
  the target (``os.replace`` is atomic on POSIX): a reader sees the old file or the new one, never half of one.
  :func:`write_text`, :func:`write_json`, :func:`write_frame` (CSV) and :func:`save_figure` are its common uses.
- :func:`read_cached_tensors` / :func:`read_cached_arrays`: a cache entry is read with ``weights_only=True`` /
  ``allow_pickle=False``; one that cannot be read that way (damaged, or holding pickled objects) is reported,
  removed and computed again, so a cache file from elsewhere never runs code.
- :func:`disk_errors`: a write that fails for lack of room or permission becomes one paragraph naming the folder.
- :func:`fault_point`: named moments inside writes where a test (only) can kill the process: ``FTLAB_FAULT``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ftlab.utils.errors import FtlabError

log = logging.getLogger(__name__)

# tests only: "<point>" kills (SIGKILL) at that write point; "<point>#<n>" only the n-th time this process
# reaches it (a later job of a sweep); "<point>:sleep=<s>" waits there
FAULT_ENV = "FTLAB_FAULT"
_reached: dict[str, int] = {}  # write point -> times this process reached it (only counted under FTLAB_FAULT)
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


class DiskWriteError(FtlabError, OSError):
    """A file could not be written: the disk is full, a size limit was reached, or the folder is read-only."""


def fault_point(name: str, tmp: Path | None = None) -> None:
    """Kill this process here with SIGKILL if ``FTLAB_FAULT`` names ``name`` (fault-injection tests only).

    ``tmp``: the temporary file being written; it is cut to half its size first, as a write cut off would leave it.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    _reached[name] = _reached.get(name, 0) + 1
    for item in spec.split(","):
        point, _, action = item.partition(":")
        point, _, nth = point.partition("#")
        if point != name or (nth and int(nth) != _reached[name]):
            continue
        if action.startswith("sleep="):
            time.sleep(float(action.split("=", 1)[1]))
            continue
        if tmp is not None and tmp.is_file():
            os.truncate(tmp, tmp.stat().st_size // 2)
        os.kill(os.getpid(), signal.SIGKILL)


def temporary_name(path: Path) -> Path:
    """A name next to ``path`` that no other process uses (pid and a random part): concurrent writers never mix."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: Path, write: Callable[[Path], Any], point: str | None = None) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path``; on failure the temporary file is removed and ``path`` kept.

    ``point``: the name of this write for :func:`fault_point`.
    """
    tmp = temporary_name(path)
    try:
        write(tmp)
        if point:
            fault_point(point, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str, point: str | None = None) -> None:
    """``path.write_text(text)``, atomically (:func:`atomic_write`)."""
    atomic_write(Path(path), lambda tmp: tmp.write_text(text), point=point)


def write_json(path: Path, record: Any, point: str | None = None) -> None:
    """``record`` as indented JSON (one trailing newline), atomically."""
    write_text(path, json.dumps(record, indent=2) + "\n", point=point)


def write_frame(path: Path, frame: Any, **to_csv: Any) -> None:
    """A pandas DataFrame as CSV (``DataFrame.to_csv`` arguments), atomically."""
    atomic_write(Path(path), lambda tmp: frame.to_csv(tmp, **to_csv))


def save_figure(fig: Any, path: Path, **savefig: Any) -> None:
    """A matplotlib figure, atomically; the format comes from ``path``'s suffix (the temporary name has none)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **savefig))


def _unreadable(path: Path, what: str, err: BaseException) -> None:
    log.warning(
        "%s %s could not be read as plain data (%s: %s); it was removed and is computed again. A cache entry "
        "from elsewhere is never trusted to hold anything but tensors.",
        what,
        path,
        type(err).__name__,
        str(err).splitlines()[0] if str(err) else "",
    )
    path.unlink(missing_ok=True)


def read_cached_tensors(path: Path) -> Any | None:
    """A cached ``torch.save`` file read with ``weights_only=True``; ``None`` (and removed) if it cannot be."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        _unreadable(path, "The cache file", err)
        return None


def read_cached_arrays(path: Path) -> dict[str, Any] | None:
    """A cached ``.npz`` read with ``allow_pickle=False``; ``None`` (and removed) if it cannot be."""
    import zipfile

    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as cached:
            return {name: cached[name] for name in cached.files}
    except FileNotFoundError:
        return None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        _unreadable(path, "The cache file", err)
        return None


def disk_error(err: BaseException, folder: Path) -> DiskWriteError | None:
    """``err`` as one paragraph if it is a write that failed for room or permission (else ``None``)."""
    if not isinstance(err, OSError) or err.errno not in _DISK_ERRNOS:
        return None
    where = Path(err.filename).parent if err.filename else folder
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = f"make {where} writable, or point paths.log_dir (runs) or paths.cache_dir (caches) at a folder that is"
    else:
        fix = (
            f"free space on that disk (df -h {where}), raise the file-size limit (ulimit -f) if one is set, or point "
            "paths.log_dir (runs) or paths.cache_dir (caches) at a disk with room"
        )
    return DiskWriteError(
        f"ftlab could not write to {where} ({os.strerror(err.errno)}). The run stopped: {fix}. Files written "
        "before are untouched (files are written to a temporary name and renamed); continue with "
        "resume=<run folder> once there is room.",
    )


@contextmanager
def disk_errors(folder: Path) -> Iterator[None]:
    """Turn a failed write under the block into a :class:`DiskWriteError` naming the folder (default ``folder``)."""
    try:
        yield
    except OSError as err:
        mapped = disk_error(err, folder)
        if mapped is None:
            raise
        raise mapped from err
