"""``malloc_tuning``: glibc keeps freed memory in the process, so re-allocating a step's buffers costs no page faults."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from ftlab import train as train_mod

from conftest import compose_cfg, tiny_text_overrides

# One step-sized buffer (24 MiB) allocated, written and freed in a fresh interpreter (the allocator state is per
# process), read through glibc's own accounting (mallinfo2): where the block came from and what stayed in the process
# after the free. Page-fault counts are not used: with transparent huge pages (CI's machine, or glibc's
# ``glibc.malloc.hugetlb`` tunable) the default allocator faults once per 2 MiB and the counts no longer tell the
# two settings apart, while the accounting does.
PROBE = """
import ctypes, json, sys
import torch
from ftlab.utils.allocator import tune_malloc
applied = tune_malloc(sys.argv[1] == "1")
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
MiB = 1 << 20
before = libc.mallinfo2()
buffer = torch.empty(24 * MiB // 4).fill_(1.0)
during = libc.mallinfo2()
del buffer
after = libc.mallinfo2()
print(json.dumps({
    "applied": applied,
    "mmapped_mib": (during.hblkhd - before.hblkhd) / MiB,
    "kept_free_mib": (after.fordblks - before.fordblks) / MiB,
}))
"""


def _probe(tuned: bool, tunables: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "1" if tuned else "0"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _has_mallinfo2() -> bool:
    return platform.libc_ver()[0] == "glibc" and hasattr(ctypes.CDLL(None), "mallinfo2")


@pytest.mark.skipif(
    not _has_mallinfo2(), reason="mallopt is glibc's (elsewhere a no-op); mallinfo2 needs glibc 2.33"
)
@pytest.mark.parametrize("tunables", ["", "glibc.malloc.hugetlb=1"], ids=["default_pages", "huge_pages"])
def test_tuned_heap_keeps_freed_memory_between_steps(tunables: str) -> None:
    default, tuned = _probe(False, tunables), _probe(True, tunables)
    assert tuned["applied"] and not default["applied"]
    # glibc's defaults: a 24 MiB block is mmap-ed and unmapped on free, so the next step faults it in again
    assert default["mmapped_mib"] >= 24 and default["kept_free_mib"] < 24, default
    # tuned: it comes from the heap and stays there, free for the next step
    assert tuned["mmapped_mib"] == 0 and tuned["kept_free_mib"] >= 24, tuned


@pytest.mark.parametrize("enabled", [True, False])
def test_train_applies_the_setting(
    enabled: bool, reviews_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(train_mod, "tune_malloc", lambda flag: calls.append(flag) or flag)
    overrides = tiny_text_overrides(reviews_csv, tmp_path) + [
        f"malloc_tuning={str(enabled).lower()}",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0",
        "trainer.limit_test_batches=1",
    ]
    train_mod.train(compose_cfg(overrides, tmp_path / "run"))
    assert calls == [enabled]
