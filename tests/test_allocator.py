"""``malloc_tuning``: glibc keeps freed memory in the process, so re-allocating a step's buffers costs no page faults."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from ftlab import train as train_mod

from conftest import compose_cfg, tiny_text_overrides

# A training step in miniature, in a fresh interpreter (the allocator state is per process): 30 buffers of 2 MiB
# written and freed, repeated; minor page faults per repetition after two repetitions of warm-up.
PROBE = """
import json, resource, sys
import torch
from ftlab.utils.allocator import tune_malloc
applied = tune_malloc(sys.argv[1] == "1")
def step():
    buffers = [torch.empty(512 * 1024).fill_(1.0) for _ in range(30)]
    del buffers
for _ in range(2):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _probe(tuned: bool) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "1" if tuned else "0"], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's; elsewhere a no-op")
def test_tuned_heap_keeps_freed_memory_between_steps() -> None:
    default, tuned = _probe(False), _probe(True)
    assert tuned["applied"] and not default["applied"]
    # glibc's defaults give the 60 MiB back to the kernel and fault it in again (~1,500 faults a step here);
    # tuned, the same pages are reused
    assert default["faults"] > 300, default
    assert tuned["faults"] < default["faults"] / 5, (default, tuned)


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
