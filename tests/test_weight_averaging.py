"""callbacks=ema / callbacks=swa (ftlab.averaging): validation, best.ckpt, test and eval on the averaged weights;
resume continues the average exactly (and adversarial training's perturbations)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from finetune_helpers import compose_cfg, tiny_run_overrides
from ftlab.averaging import EMA
from ftlab.evaluate import evaluate
from ftlab.train import train
from ftlab.utils.errors import ConfigError

from conftest import CONF_DIR

# 3 steps per epoch, no feature cache (the resumed leg must compute what the uninterrupted one computes)
SMALL = ["trainer.limit_train_batches=3", "feature_cache=false", "scheduler=constant"]


def run(tmp: Path, name: str, extra: list[str]) -> dict:
    cfg = compose_cfg([*tiny_run_overrides(tmp, tmp / name), *SMALL, *extra])
    metrics = train(cfg)
    (tmp / name / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, tmp / name / ".hydra" / "config.yaml")  # what a Hydra run writes (eval reads it)
    return metrics


def read(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ema")
    metrics = run(tmp, "run", ["callbacks=ema", "callbacks.ema.decay=0.8", "trainer.max_epochs=2"])
    return tmp, metrics


def test_ema_checkpoint_holds_the_averaged_weights_and_test_and_eval_use_them(ema_run):
    tmp, metrics = ema_run
    best = read(tmp / "run" / "checkpoints" / "best.ckpt")
    assert int(best["averaging_state"]["n_averaged"]) == 3 * (best["epoch"] + 1)  # one update per step
    averaged, current = best["state_dict"], best["current_model_state"]
    gap = max((averaged[k].float() - current[k].float()).abs().max().item() for k in averaged)
    assert gap > 1e-3  # the averaged weights are not the training weights
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        eval_cfg = compose(config_name="eval", overrides=[f"run={tmp / 'run'}", "split=test"])
    scored = evaluate(eval_cfg)  # loads best.ckpt's state_dict: the averaged weights
    # Lightning's own callback would have tested the training weights (current_model_state); ftlab's tests the
    # averaged ones, which eval and export read
    assert scored["test/loss"] == pytest.approx(metrics["test/loss"], abs=1e-6)
    assert scored["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)


@pytest.mark.slow  # three tiny runs: ~50 s alone
def test_swa_resume_matches_the_uninterrupted_run(tmp_path):
    # with adversarial=pgd: its random starts are seeded by (seed, epoch, batch), so resume is exact with it too
    swa = ["callbacks=swa", "callbacks.swa.start_epoch=1", "adversarial=pgd"]
    full = run(tmp_path, "full", [*swa, "trainer.max_epochs=2"])
    run(tmp_path, "part", [*swa, "trainer.max_epochs=1"])  # stopped before the average starts
    first = read(tmp_path / "part" / "checkpoints" / "last.ckpt")
    assert "averaging_state" not in first  # nothing averaged yet: the training weights only
    resumed = run(tmp_path, "part", [*swa, "trainer.max_epochs=2", f"resume={tmp_path / 'part'}"])
    a, b = (
        read(tmp_path / "full" / "checkpoints" / "last.ckpt"),
        read(tmp_path / "part" / "checkpoints" / "last.ckpt"),
    )
    assert int(a["averaging_state"]["n_averaged"]) == int(b["averaging_state"]["n_averaged"]) == 3
    for key in ("state_dict", "current_model_state"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for key in ("test/acc", "test/loss", "best/val/acc"):
        assert resumed[key] == pytest.approx(full[key], abs=1e-6)


def test_ema_decay_is_checked():
    with pytest.raises(ConfigError, match="callbacks.ema.decay=1.5"):
        EMA(decay=1.5)
