"""Rebuild a trained module from its run folder: the saved ``.hydra/config.yaml`` plus a checkpoint.

Used by ``ftlab-eval``, ``ftlab-predict`` and ``ftlab-export``. Nothing is downloaded: the backbone is built with
its pretrained-weight switches turned off (``pretrained``, ``weights``, ``checkpoint``), because every weight comes
from the checkpoint. Checkpoints are read with ``torch.load(weights_only=True)``: a Lightning checkpoint written by
ftlab holds only tensors, numbers, strings and plain containers, so no pickled code ever runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ftlab.models.module import FinetuneModule
from ftlab.runs import folder
from ftlab.tasks import build_task
from ftlab.utils.errors import ConfigError, DataError, DataFileError

log = logging.getLogger(__name__)

# Backbone keys that make a constructor load pretrained weights; the checkpoint overwrites them anyway.
NO_PRETRAINED = {"pretrained": False, "weights": None, "checkpoint": None}


@dataclass
class LoadedRun:
    """A run folder, its config (``paths.output_dir`` = the folder), the checkpoint used and the module (eval mode)."""

    run_dir: Path
    cfg: DictConfig
    ckpt_path: Path
    module: FinetuneModule

    @property
    def label_names(self) -> list[str] | None:
        return self.module.hparams.get("label_names")


def load_run_config(run_dir: str | Path) -> DictConfig:
    """The run's composed config with ``paths.output_dir`` pointing at the run folder (no Hydra runtime needed)."""
    run_dir = Path(run_dir).expanduser().resolve()
    path = run_dir / folder.CONFIG_FILE
    if not path.is_file():
        raise DataFileError(
            f"run={run_dir}: {path} does not exist. Give the folder of a finished ftlab run "
            "(outputs/<name>/<date>_<time>, the folder that holds .hydra/, checkpoints/ and metrics.json)."
        )
    cfg: Any = OmegaConf.load(path)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return cfg


def find_checkpoint(run_dir: Path, ckpt: str | Path | None = None) -> Path:
    """``ckpt`` if given, else the run's ``best.ckpt``, else its ``last.ckpt``."""
    if ckpt:
        path = Path(ckpt).expanduser()
        if not path.exists():  # a file, or an FSDP sharded checkpoint's folder
            raise DataFileError(f"ckpt={ckpt}: no such checkpoint file.")
        return path.resolve()
    for name in (folder.BEST_CKPT, folder.LAST_CKPT):
        if (run_dir / name).exists():
            return run_dir / name
    dropped = ""
    # a finished run (metrics.json) wrote its checkpoints, so they were removed after the test
    if (run_dir / folder.METRICS_FILE).is_file():
        dropped = (
            " (the run finished: keep_checkpoints=false deletes them after the test; retrain to get them)"
        )
    raise DataFileError(
        f"{run_dir} has neither {folder.BEST_CKPT} nor {folder.LAST_CKPT}{dropped}; give a checkpoint with "
        "ckpt=<file>."
    )


def build_module(
    cfg: DictConfig,
    backbone: torch.nn.Module,
    num_classes: int,
    label_names: list[str] | None,
    make: Callable[..., Any] = instantiate,
    task: str | None = None,
    class_counts: list[int] | None = None,
) -> FinetuneModule:
    """Task, head, fine-tuning policy and :class:`FinetuneModule` around ``backbone``: what ``train`` runs and what
    eval/predict/export rebuild (the policy matters: a PEFT policy wraps the backbone, so the state dict keys
    follow it). ``task`` defaults to ``cfg.data.task``; ``class_counts`` (training examples per class) feed
    ``module.class_weights=balanced`` when training, and a rebuilt run reads the weights from its checkpoint.
    ``make`` instantiates the user's head and policy (``train`` unwraps their errors)."""
    options: dict[str, Any] = {
        str(k): v
        for k, v in dict(OmegaConf.to_container(cfg.get("module") or {}, resolve=True)).items()  # type: ignore[arg-type]
    }
    the_task = build_task(
        task or cfg.data.get("task", "classification"), num_classes, label_names, options, class_counts
    )
    head = the_task.make_head(
        backbone,
        lambda: make(cfg.model.head, in_features=backbone.out_features, num_classes=the_task.num_outputs),
    )
    return FinetuneModule(
        backbone,
        head,
        make(cfg.finetune),
        the_task,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        task_options=options,
        adversarial=make(cfg.adversarial) if cfg.get("adversarial") else None,
    )


def offline_backbone_config(cfg: DictConfig) -> DictConfig:
    """``cfg.model.backbone`` with the pretrained-weight switches off (the checkpoint holds every weight)."""
    node: Any = OmegaConf.to_container(cfg.model.backbone, resolve=True)
    for key, value in NO_PRETRAINED.items():
        if key in node:
            node[key] = value
    return DictConfig(node)


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], ckpt_path: Path) -> None:
    """``load_state_dict(strict=True)``; a mismatch is a :class:`ConfigError` that names the differing keys."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = [
            f"{label} ({len(keys)}): {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", wrong))
            if keys
        ]
        raise ConfigError(
            f"The checkpoint {ckpt_path} does not fit the module built from the run's config: "
            + "; ".join(parts)
            + ". It was written by another model/finetune config; give the run folder it belongs to, or the "
            "matching checkpoint with ckpt=<file>."
        )
    module.load_state_dict(state, strict=True)


def load_run(run_dir: str | Path, ckpt: str | Path | None = None) -> LoadedRun:
    """Rebuild the run's module from ``.hydra/config.yaml`` and load ``ckpt`` (default ``best.ckpt``) into it."""
    cfg = load_run_config(run_dir)
    run_dir = Path(cfg.paths.output_dir)
    ckpt_path = find_checkpoint(run_dir, ckpt)
    checkpoint = folder.read_checkpoint(ckpt_path)
    hparams = checkpoint.get("hyper_parameters") or {}
    if "num_classes" not in hparams or "state_dict" not in checkpoint:
        raise ConfigError(
            f"{ckpt_path} is not a checkpoint of an ftlab module (no num_classes hyper-parameter or no "
            "state_dict)."
        )
    backbone = instantiate(offline_backbone_config(cfg))
    if cfg.get("prompt"):  # prompt=verbalizer: the LM read at the template's answer slot (ftlab.verbalizer)
        backbone = instantiate(cfg.prompt).wrap(backbone, cfg.data)
    _restore_input_size(backbone, hparams.get("input_size"))
    # checkpoints written before the Task interface have no "task": one output was regression
    task = hparams.get("task") or ("regression" if int(hparams["num_classes"]) == 1 else "classification")
    module = build_module(cfg, backbone, int(hparams["num_classes"]), hparams.get("label_names"), task=task)
    load_state(module, checkpoint["state_dict"], ckpt_path)
    module.eval()
    return LoadedRun(run_dir, cfg, ckpt_path, module)


def _restore_input_size(backbone: Any, size: int | None) -> None:
    """The image size the run trained with (``data.input_size=auto`` chose it from the data): kept, not re-chosen."""
    from dataclasses import replace

    from ftlab.data.image import ImagePreprocessing

    preprocessing = getattr(backbone, "preprocessing", None)
    if size is not None and isinstance(preprocessing, ImagePreprocessing):
        backbone.preprocessing = replace(preprocessing, input_size=int(size), resolved=True)


def datamodule_for(run: LoadedRun, data: DictConfig | None = None, setup: bool = True) -> Any:
    """The run's data module (same seeded splits as training), or one from ``data`` whose labels must match.

    ``setup=False``: the module only (to ``encode`` raw inputs), without reading the data.
    ``data`` with a ``_target_`` replaces the run's data config; without one it is merged into it (changed keys).
    Interpolations (``${seed}``, ``${paths.cache_dir}``) resolve against the run's config.
    """
    cfg = run.cfg.copy()
    if data:
        with open_dict(cfg):
            cfg.data = data if "_target_" in data else OmegaConf.merge(cfg.data, data)
    datamodule = instantiate(cfg.data, preprocessing=run.module.backbone.preprocessing)
    if not setup:  # prediction encodes raw inputs: the preprocessing is enough, the data need not be there
        return datamodule
    datamodule.setup("test")
    names = run.label_names
    if names is not None and list(datamodule.label_names or []) != list(names):
        raise DataError(
            f"The data's labels {datamodule.label_names} are not the run's labels {names} (same names, same "
            "order). Fix the labels of the data, or fix their set and order with data.labels=[...] "
            "(data.classes for images)."
        )
    return datamodule


def batches(module: torch.nn.Module, loader: Any, device: torch.device) -> Any:
    """Yield ``(batch, logits)`` over a loader, without gradients; tensors on ``device``."""
    with torch.inference_mode():
        for batch in loader:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            yield batch, module(batch)
