"""Gradual unfreezing under 2-process CPU DDP (gloo): ranks end with identical parameters; groups waiting to be
unfrozen keep requires_grad (DDP all-reduces them) but their gradients are dropped before clipping."""

from __future__ import annotations

import json
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
        # plain SGD (update = lr * clip scale * grad) and a clip threshold below every gradient norm: the scale
        # applied to the head's update tells which gradients the clipped norm counted
        "optimizer=sgd",
        "optimizer.momentum=0",
        "optimizer.weight_decay=0",
        "trainer.gradient_clip_val=0.01",
        "+callbacks.clip_probe._target_=ddp_probe.ClipProbe",
        f"+callbacks.clip_probe.folder={tmp_path / 'probe'}",
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
        timeout=600,  # ~40 s alone; minutes on a shared, loaded machine
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
    for rank in (0, 1):
        clip = json.loads((tmp_path / "probe" / f"clip_rank{rank}.json").read_text())
        # in every epoch the groups frozen in it (epoch 0: all but the head) are bit-identical at its end
        assert set(clip["frozen"]["0"]["start"]) == {"embeddings", "layer.0", "layer.1"}
        for epoch, record in clip["frozen"].items():
            assert record["start"] == record["end"], epoch
        assert len(clip["steps"]) == 9  # 48 training texts, batches of 8 split over 2 ranks: 3 steps an epoch
        for step in clip["steps"]:
            # DDP did all-reduce gradients into the frozen groups (requires_grad kept), and the head's update was
            # scaled by max_norm / |trainable gradients| (Lightning's clip_grad_norm_ factor), not by the norm with
            # the frozen groups' gradients counted
            assert step["frozen_norm"] > 0.05 and step["trainable_norm"] > 0.01, step
            counted = 0.01 / (step["trainable_norm"] + 1e-6)
            with_frozen = 0.01 / ((step["trainable_norm"] ** 2 + step["frozen_norm"] ** 2) ** 0.5 + 1e-6)
            assert step["scale"] == pytest.approx(counted, rel=1e-3), step
            assert abs(step["scale"] - with_frozen) > 0.01 * counted, step


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
