"""The config Hydra will run, composed before Hydra runs it (for the check), and a fast ``--help``.

Both build Hydra's config search path the way ``hydra.main`` does (ftlab's ``pkg://ftlab.conf``, ``--config-path``,
``--config-dir``), so what is checked is exactly what runs.
"""

from __future__ import annotations

import os
import string
from typing import Any

from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_automatic_config_search_path, get_args_parser
from hydra.core.config_search_path import SearchPathQuery
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.object_type import ObjectType
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, read_write
from omegaconf.errors import OmegaConfBaseException

from ftlab.runs import folder
from ftlab.utils.errors import ConfigError


def _hydra(config_name: str, args: Any) -> Hydra:
    search_path = create_automatic_config_search_path(None, "ftlab.cli", args.config_path or folder.CONF_DIR)
    if args.config_dir is not None:
        if not os.path.isdir(args.config_dir):
            raise ConfigError(
                f"--config-dir {args.config_dir}: no such folder (give a folder of config groups, e.g. one holding "
                "data/my_data.yaml)."
            )
        path = f"file://{os.path.abspath(args.config_dir)}"
        search_path.prepend("command-line", path, SearchPathQuery(provider="schema"))
    return Hydra.create_main_hydra2(task_name=config_name, config_search_path=search_path)


def compose(config_name: str, args: Any, overrides: list[str] | None = None) -> DictConfig:
    """The config (with its ``hydra`` node) for parsed ``args``; a multirun's without its swept values."""
    overrides = list(args.overrides if overrides is None else overrides)
    hydra_app = _hydra(config_name, args)
    try:
        sweeps = any(o.is_sweep_override() for o in OverridesParser.create().parse_overrides(overrides))
        mode = RunMode.MULTIRUN if args.multirun or sweeps else RunMode.RUN
        cfg = hydra_app.compose_config(args.config_name or config_name, overrides, run_mode=mode)
        with read_write(cfg.hydra):
            cfg.hydra.mode = mode  # as Hydra sets it when it runs (swept() reads it)
        _set_output_dir(cfg, "hydra.sweep.dir" if mode == RunMode.MULTIRUN else "hydra.run.dir")
        HydraConfig.instance().set_config(cfg)  # so ${hydra:runtime.output_dir} & co. resolve as in the job
        return cfg
    finally:
        GlobalHydra.instance().clear()  # hydra.main sets it up again


def _set_output_dir(cfg: DictConfig, key: str) -> None:
    """``hydra.runtime.output_dir`` as Hydra sets it when the job starts (a multirun: the sweep folder)."""
    try:
        with read_write(cfg.hydra.runtime):
            cfg.hydra.runtime.output_dir = os.path.abspath(str(OmegaConf.select(cfg, key)))
    except OmegaConfBaseException:  # a folder name that needs the job (${hydra.job.num}): left unresolved
        pass


def help_text(config_name: str, args: Any) -> str:
    """Hydra's ``--help`` page (its template, groups and config), in a fraction of the time.

    Hydra's own builds a fresh copy of every registered config per option it lists (~5 s here); reading the
    options straight from the config repository gives the same page.
    """
    hydra_app = _hydra(config_name, args)
    try:
        cfg = hydra_app.compose_config(args.config_name or config_name, args.overrides, run_mode=RunMode.RUN)
        HydraConfig.instance().set_config(cfg)
        repository = hydra_app.config_loader.repository  # type: ignore[attr-defined]
        groups = _groups(repository, "")

        def listed(hydra_groups: bool) -> str:
            chosen = [g for g in sorted(groups) if (g == "hydra" or g.startswith("hydra/")) == hydra_groups]
            return "".join(f"{g}: {', '.join(sorted(groups[g]))}\n" for g in chosen)

        template = string.Template(cfg.hydra.help.template)
        job_cfg = hydra_app.get_sanitized_cfg(cfg, "job")
        return template.substitute(
            FLAGS_HELP=hydra_app.format_args_help(get_args_parser()),
            HYDRA_CONFIG_GROUPS=listed(True),
            APP_CONFIG_GROUPS=listed(False),
            CONFIG=OmegaConf.to_yaml(job_cfg, resolve=args.resolve),
        )
    finally:
        GlobalHydra.instance().clear()


def _groups(repository: Any, parent: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for group in repository.get_group_options(parent, ObjectType.GROUP):
        name = f"{parent}/{group}" if parent else group
        options = repository.get_group_options(name, ObjectType.CONFIG)
        if options:
            found[name] = options
        found.update(_groups(repository, name))
    return found


def swept(cfg: DictConfig, overrides: list[str]) -> set[str]:
    """The keys and groups a multirun sweeps (its sweep overrides, its sweeper's params); none for a single run.

    The config checked before a sweep starts holds no swept value: each job checks its own.
    """
    if OmegaConf.select(cfg, "hydra.mode") != RunMode.MULTIRUN:
        return set()
    parsed = OverridesParser.create().parse_overrides(overrides)
    keys = {o.key_or_group for o in parsed if o.is_sweep_override()}
    params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None)
    return keys | {str(k) for k in params} if isinstance(params, DictConfig) else keys
