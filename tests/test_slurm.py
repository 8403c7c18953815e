"""hydra/launcher=slurm + trainer=ddp_slurm, offline: the sbatch script submitit writes, and what a rank sees."""

from __future__ import annotations

import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

import ftlab.runs.jobs  # noqa: F401 - registers the ${ftlab.*} resolvers

from conftest import CONF_DIR

LAUNCHER = [
    "hydra/launcher=slurm",
    "trainer=ddp_slurm",
    "hydra.launcher.nodes=2",
    "hydra.launcher.tasks_per_node=4",
    "hydra.launcher.cpus_per_task=6",
    "hydra.launcher.mem_gb=64",
    "hydra.launcher.timeout_min=90",
    "hydra.launcher.partition=gpu",
    "hydra.launcher.account=proj42",
    "hydra.launcher.qos=high",
    "hydra.launcher.constraint=a100",
    "+hydra.launcher.additional_parameters.mail-type=END",
    "hydra.launcher.name=ftlab",
]


def _compose(tmp_path, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[*overrides, f"hydra.sweep.dir={tmp_path}/sweep", f"paths.log_dir={tmp_path}"],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)  # as inside a job: ${hydra:...} and ${ftlab.launcher:...} resolve
    return cfg


class _Submitted(Exception):
    pass


def test_submission_script_carries_every_launcher_value(tmp_path, monkeypatch):
    import submitit

    srun = tmp_path / "bin" / "srun"  # submitit looks for srun to know it is on a SLURM cluster
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{srun.parent}:{os.environ['PATH']}")
    cfg = _compose(tmp_path, LAUNCHER)
    launcher = instantiate(cfg.hydra.launcher)  # the plugin's SlurmLauncher, as Hydra builds it
    launcher.config = cfg
    scripts = []

    def capture(executor, fn, *args):  # instead of sbatch: the script submitit would submit
        scripts.append(
            executor._executor._make_submission_file_text("python -u -m submitit.core._submit", "0")
        )
        raise _Submitted

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    with pytest.raises(_Submitted):
        launcher.launch([["seed=1"]], initial_job_idx=0)
    lines = set(scripts[0].splitlines())
    for option in (
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",  # one GPU per rank, from tasks_per_node
        "--cpus-per-task=6",
        "--mem=64GB",
        "--time=90",
        "--partition=gpu",
        "--account=proj42",
        "--qos=high",
        "--constraint=a100",
        "--mail-type=END",
        "--signal=USR2@120",  # the warning signal ftlab.preemption turns into a checkpoint
        "--open-mode=append",  # a requeued job appends to its logs
    ):
        assert f"#SBATCH {option}" in lines, option
    assert (
        launcher.params["max_num_timeout"] == 3
    )  # requeued after a time limit, continuing from the checkpoint
    assert "srun" in scripts[0]  # one task per rank, launched by SLURM


def test_a_rank_sees_the_launcher_layout_through_slurm_environment(tmp_path, monkeypatch):
    from pytorch_lightning.plugins.environments import SLURMEnvironment

    cfg = _compose(tmp_path, [*LAUNCHER, "trainer.accelerator=cpu"])  # the layout, without GPUs here
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (
        2,
        4,
    )  # interpolated from the launcher, never typed
    slurm = {  # what SLURM sets for task 6 of 8: node 1 (second), local rank 2
        "SLURM_NTASKS": "8",
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_NNODES": "2",
        "SLURM_PROCID": "6",
        "SLURM_LOCALID": "2",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "gpu[017-018]",
        "SLURM_NODELIST": "gpu[017-018]",
        "SLURM_JOB_ID": "991",
        "SLURM_JOB_NAME": "ftlab",
    }
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    # setenv first so that monkeypatch restores these at teardown: SLURMEnvironment writes MASTER_ADDR/MASTER_PORT
    # (gpu017:15991) into os.environ, and a later DDP test in this process would try to meet there
    for key in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK"):
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False, callbacks=[])
    environment = trainer.strategy.cluster_environment
    assert isinstance(environment, SLURMEnvironment)
    assert (trainer.num_nodes, trainer.num_devices, trainer.world_size) == (2, 4, 8)
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank) == (6, 2, 1)
    # every rank meets at the job's first node, on a port derived from the job id (15000 + its last 4 digits)
    assert (environment.main_address, environment.main_port) == ("gpu017", 15991)
