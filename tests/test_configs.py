"""Every option of every config group composes, names only real constructor arguments, and instantiates.

Options are discovered from conf/, so a new option is tested the day it is added. An option that needs what this
machine lacks (a GPU, internet) gets an entry in OFFLINE or COMPOSE_ONLY below, with the reason.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import ftlab.runs.jobs  # noqa: F401  (registers the ftlab.* resolvers that configs use)

from conftest import CONF_DIR, compose_cfg, tiny_reviews

SKIP_GROUPS = {"hydra", "local", "attack"}  # attack: a group of ftlab-eval (tests/test_robustness_eval.py)
# option -> extra overrides that make it loadable offline (the option itself is what is being tested)
OFFLINE = {
    ("model", "bert"): [
        "model.backbone.name_or_path=embedded:all-MiniLM-L6-v2"
    ],  # bert-base-uncased: hub only
    ("model", "llm"): ["model.backbone.name_or_path=embedded:smollm2"],  # SmolLM2's hub original: hub only
    ("data", "hf_hub"): ["data.hub_name=glue"],  # constructor only: loading needs the hub
    ("data", "image_folder"): ["data.root=/data/flowers"],  # constructor only: root is the user's (???)
    ("data", "image_table"): [
        "data.labels_file=/data/labels.csv"
    ],  # constructor only: the user's table (???)
    ("data", "torchvision"): ["data.root=/data/cifar"],  # constructor only: the download needs internet
    # the groups copied from a transfer checkpoint: the user's (text backbones take checkpoint_groups too)
    ("finetune", "freeze_transferred"): ["model.backbone.checkpoint_groups=2"],
}
# options checked by composition and signatures only: no GPU here
COMPOSE_ONLY = {("trainer", "gpu"), ("trainer", "ddp"), ("trainer", "ddp_slurm"), ("trainer", "fsdp")}
HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


def options() -> list[tuple[str, str]]:
    found = []
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        group = path.parent.relative_to(CONF_DIR).as_posix()
        if group != "." and group.split("/")[0] not in SKIP_GROUPS:
            found.append((group, path.stem))
    return found


def _target(path: str):
    module, _, name = path.rpartition(".")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def check_signatures(node, where: str = "") -> int:
    """Every key beside a ``_target_`` is an argument of that target; returns how many targets were checked."""
    checked = 0
    if isinstance(node, dict):
        if "_target_" in node:
            params = inspect.signature(_target(node["_target_"])).parameters
            if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                unknown = set(node) - set(params) - HYDRA_KEYS
                assert not unknown, f"{where}: {node['_target_']} takes no argument(s) {sorted(unknown)}"
            checked += 1
        for key, value in node.items():
            checked += check_signatures(value, f"{where}.{key}")
    elif isinstance(node, list):
        checked += sum(check_signatures(v, f"{where}[{i}]") for i, v in enumerate(node))
    return checked


def _family(cfg) -> str:
    return "image" if "Image" in str(cfg.data.get("_target_", "")) else "text"


@pytest.fixture(scope="module")
def csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "r.csv"
    tiny_reviews(10).rename(columns={"review": "text", "stars": "label"}).to_csv(path, index=False)
    return path


@pytest.mark.parametrize(("group", "option"), options(), ids=lambda v: str(v))
def test_option_composes_and_instantiates(group, option, csv, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    override = f"{group}={option}"
    extra = [
        *OFFLINE.get((group, option), []),
        f"paths.cache_dir={tmp_path}/cache",
        f"paths.log_dir={tmp_path}",
    ]
    if group == "data" and option in ("text_files", "token_files"):  # a path to compose; setup never reads it
        extra.append(f"data.train_file={csv}")
    cfg = compose_cfg([override, *extra], tmp_path / "run")
    assert check_signatures(OmegaConf.to_container(cfg, resolve=False)) > 0
    if (group, option) in COMPOSE_ONLY or group in ("experiment", "hparams_search"):
        return
    if group == "data":
        model = "tiny_resnet" if _family(cfg) == "image" else "tiny_bert"
        cfg = compose_cfg([override, *extra, f"model={model}"], tmp_path / "run")
    if group in ("data", "model"):
        backbone = instantiate(cfg.model.backbone)
        data = instantiate(cfg.data, preprocessing=backbone.preprocessing) if group == "data" else None
        head = instantiate(cfg.model.head, in_features=backbone.out_features, num_classes=3)
        assert head(torch.zeros(2, backbone.out_features)).shape == (2, 3)
        assert data is None or data.batch_size > 0
    elif group == "finetune":
        assert hasattr(instantiate(cfg.finetune), "frozen")
    elif group == "optimizer":
        optimizer = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(2))])
        assert optimizer.param_groups[0]["lr"] == cfg.optimizer.lr
    elif group == "scheduler":
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
        assert cfg.scheduler == {} or "scheduler" in instantiate(cfg.scheduler)(optimizer, total_steps=100)
    elif group in ("callbacks", "logger"):
        for node in (cfg[group] or {}).values():
            if node:
                assert instantiate(node) is not None
    elif group == "adversarial":
        assert instantiate(cfg.adversarial).epsilon > 0
    elif group in ("trainer", "debug"):
        assert instantiate(cfg.trainer).max_epochs is not None or cfg.trainer.get("fast_dev_run")


def test_train_yaml_names_the_path_in_data_flow_order():
    defaults = OmegaConf.load(CONF_DIR / "train.yaml").defaults
    names = [next(iter(d)) if isinstance(d, dict) or OmegaConf.is_dict(d) else d for d in defaults]
    # _self_ first: experiment / debug / local files override train.yaml's own values (seed, monitor, name, ...)
    assert names[0] == "_self_"
    assert (
        names[1:15]
        == [
            "data",
            "model",
            "task",  # task=masked_lm: sets data.task and the monitored metric, so after data (and model)
            "finetune",
            "zero_shot",  # zero_shot=embedding replaces the head and trains nothing (after model, which it overrides)
            "prompt",  # prompt=verbalizer replaces the head (after model, which it overrides)
            "optimizer",
            "scheduler",
            "adversarial",
            "trainer",
            "callbacks",
            "logger",
            "paths",
            "hydra",
        ]
    )
    # few_shot_method: a bundle of the choices above (model, finetune, zero_shot, prompt); experiments set budgets
    assert names[15:] == ["few_shot_method", "experiment", "hparams_search", "debug", "optional local"]


def test_monitor_is_named_once_and_interpolated():
    cfg = OmegaConf.to_container(compose_cfg([]), resolve=False)
    callbacks = cfg["callbacks"]
    assert callbacks["model_checkpoint"]["monitor"] == "${monitor}"
    assert callbacks["early_stopping"]["monitor"] == "${monitor}"
    assert callbacks["early_stopping"]["mode"] == "${monitor_mode}"


@pytest.mark.parametrize(
    ("overrides", "monitor", "mode"),
    [
        ([], "val/acc", "max"),
        (["data.task=regression"], "val/mse", "min"),
        (["data.task=multilabel"], "val/f1_micro", "max"),
        (["data=wnut16"], "val/f1", "max"),
        (["task=masked_lm"], "val/perplexity", "min"),
        (["data=instruct_rotten_tomatoes", "model=smollm2_lm"], "val/loss", "min"),
        (["monitor=val/loss"], "val/loss", "min"),  # the mode follows a monitor the user names
        (["data=wnut16", "monitor=val/acc"], "val/acc", "max"),
        (["monitor=val/mae", "monitor_mode=max"], "val/mae", "max"),  # and a mode the user names wins
    ],
)
def test_the_monitored_metric_follows_the_task_unless_set(overrides, monitor, mode):
    from ftlab.runs.jobs import BUILTIN_MONITORS
    from ftlab.tasks import TASKS

    assert {name: TASKS[name].monitor for name in BUILTIN_MONITORS} == BUILTIN_MONITORS
    cfg = compose_cfg(overrides)
    assert (cfg.monitor, cfg.monitor_mode) == (monitor, mode)
    assert (cfg.callbacks.model_checkpoint.monitor, cfg.callbacks.early_stopping.mode) == (monitor, mode)


def test_hydra_launcher_options_compose():
    launcher_dir = CONF_DIR / "hydra" / "launcher"
    for path in sorted(launcher_dir.glob("*.yaml")) if launcher_dir.is_dir() else []:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(
                config_name="train", overrides=[f"hydra/launcher={path.stem}"], return_hydra_config=True
            )
        assert _target(cfg.hydra.launcher._target_) is not None
