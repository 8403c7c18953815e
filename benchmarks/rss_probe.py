"""A Hydra callback for benchmarks/sweep_memory.py: the process's resident memory after each job of a sweep."""

from __future__ import annotations

import gc
import os
from typing import Any

from hydra.experimental.callback import Callback


def rss_mib() -> float:
    """Resident set size now (not the peak), in MiB, from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssProbe(Callback):
    """Appends ``<job number> <RSS MiB>`` to ``$FTLAB_RSS_LOG`` after each job (after a garbage collection)."""

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        gc.collect()
        with open(os.environ["FTLAB_RSS_LOG"], "a") as f:
            f.write(f"{config.hydra.job.num} {rss_mib():.1f}\n")
