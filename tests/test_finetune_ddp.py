"""Gradual unfreezing under 2-process CPU DDP (gloo): ranks end with identical parameters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_helpers import read_probe, tiny_run_overrides
from ftlab.finetuning import FinetunePolicy
from ftlab.finetuning.distributed import distributed_keep_grad
from ftlab.utils.errors import ConfigError

TESTS = Path(__file__).resolve().parent


@pytest.mark.slow
def test_gradual_unfreezing_keeps_ranks_identical_under_ddp(tmp_path):
    overrides = tiny_run_overrides(tmp_path, tmp_path / "run", tmp_path / "probe")
    overrides = [o for o in overrides if not o.startswith("trainer.devices")]
    overrides += [
        "trainer=ddp_cpu",
        "finetune=gradual_unfreeze",
        "trainer.max_epochs=3",
        "scheduler=constant",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(TESTS.parent / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")]
        ),
    }
    done = subprocess.run(
        [sys.executable, "-m", "ftlab.train", *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [read_probe(tmp_path / "probe", rank) for rank in (0, 1)]
    # the two ranks saw different batches, yet every parameter and buffer is the same after training
    assert ranks[0]["state"] == ranks[1]["state"]
    for probe in ranks:
        # groups waiting to be unfrozen kept requires_grad (so DDP all-reduces them) but did not move while frozen
        assert probe["grads"]["0"] == ["embeddings", "layer.0", "layer.1"]
        assert {n.split(".")[0] for n in probe["trainable"]["0"]} == {"backbone", "head"}
        assert probe["start"]["embeddings"] == probe["end"]["embeddings"]  # never unfrozen in 3 epochs
        assert (
            probe["start"]["layer.0"] != probe["end"]["layer.0"]
        )  # unfrozen at epoch 2, after DDP wrapped it


class FakeTrainer:
    def __init__(self, world_size: int, strategy: object):
        self.world_size, self.strategy = world_size, strategy


def test_unsupported_multiprocess_strategy_with_unfreezing_fails_clearly():
    names = ["embeddings", "layer.0", "head"]
    with pytest.raises(ConfigError, match="gradual unfreezing.*not supported"):
        distributed_keep_grad(FakeTrainer(2, object()), FinetunePolicy(every_n_epochs=1), names)
    # a static freeze and a single process need nothing
    assert distributed_keep_grad(FakeTrainer(2, object()), FinetunePolicy(k=1), names) == set()
    assert distributed_keep_grad(FakeTrainer(1, object()), FinetunePolicy(every_n_epochs=1), names) == set()
