"""The sweep configs compose: launchers, the Optuna search (direction from monitor_mode), W&B naming keys."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import ftlab.runs.jobs  # noqa: F401  (registers the ftlab.* resolvers, as ftlab.train does)

CONF = str(Path(__file__).resolve().parents[1] / "conf")


@pytest.fixture
def hydra_cfg():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        yield lambda *o: compose("train", overrides=["model=tiny_bert", *o], return_hydra_config=True)
    GlobalHydra.instance().clear()


def test_parallel_launcher_is_joblib_with_two_jobs(hydra_cfg):
    launcher = hydra_cfg("hydra/launcher=parallel").hydra.launcher
    assert launcher._target_.endswith("JoblibLauncher") and launcher.n_jobs == 2


def test_slurm_launcher_documents_its_resources(hydra_cfg):
    launcher = hydra_cfg("hydra/launcher=slurm", "hydra.launcher.partition=gpu").hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert (launcher.gpus_per_node, launcher.mem_gb, launcher.timeout_min) == (1, 32, 240)
    assert (Path(CONF) / "hydra/launcher/slurm.yaml").read_text().count("#") >= 8  # each key says what it is


@pytest.mark.parametrize(("mode", "direction"), [("max", "maximize"), ("min", "minimize")])
def test_optuna_direction_follows_monitor_mode(hydra_cfg, mode, direction):
    sweeper = hydra_cfg("hparams_search=optuna", f"monitor_mode={mode}").hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == direction
    assert set(sweeper.params) == {"optimizer.lr", "optimizer.weight_decay", "scheduler.warmup"}
    assert sweeper.max_failure_rate == 1.0


def test_wandb_logger_group_and_tags(hydra_cfg):
    cfg = hydra_cfg("logger=wandb")
    assert cfg.hydra.job.config.override_dirname.exclude_keys[:2] == ["paths.log_dir", "paths.cache_dir"]
    wandb = cfg.logger.wandb
    assert wandb._target_.endswith("WandbLogger")
    assert wandb.group == "train"  # a single run: grouped by ${name}
    assert wandb.name == "default"  # outside a Hydra job there is no override_dirname to name the run by
    assert list(wandb.tags) == ["train"]  # the group choices are added inside a job (see test_sweeps)


def test_experiment_values_override_train_yaml(hydra_cfg):
    cfg = hydra_cfg("experiment=seeds_demo")
    assert cfg.name == "seeds_demo" and cfg.model.backbone.config_overrides.hidden_size == 32
    assert dict(cfg.hydra.sweeper.params) == {"seed": "1,2,3", "optimizer.lr": "1e-4,1e-3"}
