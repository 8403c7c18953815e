"""Host memory allocator settings for training (``malloc_tuning: true``, the default).

PyTorch's CPU tensors are allocated with glibc's ``malloc``. With glibc's defaults, blocks above a dynamic threshold
are ``mmap``-ed and handed back to the kernel when freed, and free memory at the top of the heap is trimmed back
as soon as it exceeds twice that threshold. A training step frees and re-allocates the same activation and
gradient buffers every step, so the process keeps returning memory to the kernel and taking it back, and each new
page costs a page fault and is zeroed by the kernel inside whichever operator first writes it (measured on MiniLM:
950-4,800 minor faults per step, varying with the heap's history; docs/speed.md).

``tune_malloc`` makes the heap keep what it has: allocations up to 32 MiB (glibc's largest allowed
``M_MMAP_THRESHOLD`` on 64-bit) come from the heap, up to 1 GiB of free memory stays in the process
(``M_TRIM_THRESHOLD``) and the heap grows in 64 MiB steps (``M_TOP_PAD``). This is what the PyTorch CPU performance
guide gets by preloading jemalloc or tcmalloc (``LD_PRELOAD``), which a library cannot do for a process that has
already started; ``mallopt`` can. Measured with the benchmark's runners taking turns step by step (8 repetitions of
12 MiniLM steps): 1.0% more examples/s than ``malloc_tuning=false`` (median), the mean step shorter in 7 of 8
repetitions, at the cost of keeping freed memory mapped (peak RSS 2.10 vs 1.91 GB; docs/speed.md). It changes
only when memory goes back to the kernel, never a result. Off: ``malloc_tuning=false``; no effect where the C
library is not glibc (macOS, Windows, musl).
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = {
    "M_MMAP_THRESHOLD": (M_MMAP_THRESHOLD, 32 << 20),
    "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, 1 << 30),
    "M_TOP_PAD": (M_TOP_PAD, 64 << 20),
}
_applied = False


def tune_malloc(enabled: bool = True) -> bool:
    """Apply the settings above to this process once; True when they are in effect."""
    global _applied
    if not enabled or _applied:
        return _applied
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        log.debug(
            "malloc_tuning: not glibc (%s), nothing changed", platform.libc_ver()[0] or platform.system()
        )
        return False
    libc = ctypes.CDLL(None)
    refused = [name for name, (param, value) in SETTINGS.items() if libc.mallopt(param, value) != 1]
    if refused:  # glibc returns 0 for a value it does not accept; the others stay applied
        log.warning("malloc_tuning: glibc refused %s; the allocator keeps its defaults for those", refused)
    _applied = not refused
    log.debug("malloc_tuning: %s", {k: v for k, (_, v) in SETTINGS.items()})
    return _applied
