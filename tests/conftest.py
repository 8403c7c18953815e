"""Shared fixtures: composing configs without a Hydra run, tiny datasets written to tmp folders, CLI runners."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

POSITIVE = [
    "a wonderful, moving film",
    "great acting and a clever plot",
    "funny and warm",
    "a delight from start to end",
    "beautifully shot and well told",
    "smart, tender and true",
    "the best film this year",
    "superb and gripping",
]
NEGATIVE = [
    "a dull, lifeless mess",
    "boring and far too long",
    "the plot makes no sense",
    "badly acted and flat",
    "a tedious waste of time",
    "clumsy and loud",
    "the worst film this year",
    "nothing works here",
]


def tiny_reviews(n_per_class: int = 40) -> pd.DataFrame:
    """A small, learnable sentiment table: (text, label) with labels 'neg' / 'pos'."""
    rows = []
    for i in range(n_per_class):
        rows.append({"review": f"{POSITIVE[i % len(POSITIVE)]} #{i}", "stars": "pos"})
        rows.append({"review": f"{NEGATIVE[i % len(NEGATIVE)]} #{i}", "stars": "neg"})
    return pd.DataFrame(rows)


@pytest.fixture(autouse=True)
def _no_hydra_state_left_behind():
    """A test that runs a Hydra app in-process (a multirun especially) leaves Hydra's singletons set; the next
    test would then see a Hydra job (``ftlab.runs.jobs.is_multirun()`` true) that is not there. The environment is
    restored too: Lightning's cluster environments write MASTER_ADDR/MASTER_PORT into it, and a later DDP run
    (whose ranks inherit it) would try to meet there. So is the SIGINT handler: Lightning ignores SIGINT after a
    KeyboardInterrupt in fit and leaves it at the OS default after a DDP teardown, and a process a later test starts
    would inherit an ignored SIGINT (Ctrl-C tests then see nothing happen)."""
    environment = dict(os.environ)
    sigint = signal.getsignal(signal.SIGINT)
    yield
    os.environ.clear()
    os.environ.update(environment)
    if signal.getsignal(signal.SIGINT) is not sigint and sigint is not None:
        signal.signal(signal.SIGINT, sigint)
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().cfg = None
    GlobalHydra.instance().clear()


@pytest.fixture
def reviews_csv(tmp_path: Path) -> Path:
    path = tmp_path / "reviews.csv"
    tiny_reviews().to_csv(path, index=False)
    return path


def tiny_text_overrides(csv: Path, tmp_path: Path) -> list[str]:
    """A fast run: tiny BERT on the tiny table, CPU, no progress output."""
    return [
        "model=tiny_bert",
        "data=text_files",
        f"data.train_file={csv}",
        "data.text_column=review",
        "data.label_column=stars",
        "data.max_length=16",
        "data.batch_size=8",
        f"paths.cache_dir={tmp_path}/cache",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "callbacks.progress_bar.kind=log",
        "optimizer.lr=3e-3",
    ]


def compose_cfg(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """The composed ``train`` config with ``paths.output_dir`` set (outside a run there is no Hydra runtime)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=False)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


def run_cli(module: str, args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m ftlab.<module> args`` as a user would; returns the finished process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", f"ftlab.{module}", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def only_run_dir(log_dir: Path, name: str = "train") -> Path:
    runs = sorted((log_dir / name).iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need a CUDA device: deselected (not skipped) where torch sees none."""
    import torch

    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]
        config.hook.pytest_deselected(items=gpu)
