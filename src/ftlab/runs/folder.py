"""The run folder contract (see README, "Run folder"): what a run writes, and reading it back."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftlab.runs.choices import check_sweep_choices, resume_run_overrides  # group choices on resume
from ftlab.utils.errors import ConfigError, DataFileError, FtlabError, ModelLoadError
from ftlab.utils.safe_files import atomic_write

# conf/ sits at the repository root (the design card's layout) and installs as the package ftlab.conf
# (pyproject.toml maps it): Hydra reads it the same way from a clone (editable install) and from a wheel.
CONF_PACKAGE = "ftlab.conf"
CONF_DIR = f"pkg://{CONF_PACKAGE}"
# Every file name of the run folder, named here only.
METRICS_FILE = "metrics.json"
LABELS_FILE = "labels.json"
THRESHOLDS_FILE = (
    "thresholds.json"  # a multi-label run's per-label decision thresholds (ftlab.tasks.multilabel)
)
STATUS_FILE = "status.json"  # a sweep job's completed/failed record (ftlab.runs.jobs)
BACKBONE_FILE = "backbone.pt"  # the backbone alone (save_backbone=true), for transfer
SETFIT_BODY_FILE = "setfit_body.pt"  # finetune=setfit: the body after its contrastive stage (resume)
# a causal_lm run's scored test generations (prompt, reference, output, scores)
GENERATIONS_FILE = "generations_test.jsonl"
OOF_FILE = "oof_predictions.csv"  # a k-fold run's validation-fold predictions (ftlab.crossval)
CONFIG_FILE = ".hydra/config.yaml"
OVERRIDES_FILE = ".hydra/overrides.yaml"
MULTIRUN_FILE = "multirun.yaml"  # in a sweep folder
CHECKPOINT_DIR = "checkpoints"
LAST_CKPT = f"{CHECKPOINT_DIR}/last.ckpt"
BEST_CKPT = f"{CHECKPOINT_DIR}/best.ckpt"


def conf_path() -> Path:
    """The config tree as a folder: the clone's ``conf/`` (editable install) or the installed package's copy."""
    from importlib.resources import files

    return Path(str(files(CONF_PACKAGE)))


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint file (Lightning ``.ckpt`` or a plain state dict) or an FSDP sharded checkpoint folder as plain
    data, with ``weights_only=True``.

    The one checkpoint reader of ftlab: rebuilding a run, resuming it and transferring a backbone all read through
    it, so a model file from elsewhere never runs pickled code.
    """
    import pickle

    import torch

    try:
        if path.is_dir():  # an FSDP sharded checkpoint: its shards consolidated in this process
            from ftlab.finetuning.sharding import read_sharded_checkpoint

            return read_sharded_checkpoint(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ModelLoadError(
            f"{path} holds objects other than tensors and plain values, so it was not loaded (weights_only=True "
            f"refuses to run pickled code): {str(err).splitlines()[0]}. Only load checkpoints you trust; an "
            "ftlab checkpoint never needs this."
        ) from err
    except (OSError, RuntimeError, EOFError) as err:
        raise ModelLoadError(f"{path} could not be read as a PyTorch checkpoint: {err}") from err


def check_fresh(output_dir: Path) -> None:
    """Refuse to train into a folder that already holds a run's results (they would be overwritten)."""
    taken = [name for name in (METRICS_FILE, LAST_CKPT, BEST_CKPT) if (output_dir / name).exists()]
    if taken:
        raise ConfigError(
            f"The run folder {output_dir} already holds {', '.join(taken)}. A new run never overwrites one: "
            f"choose another hydra.run.dir, or continue that run with resume={output_dir}."
        )


def resume_checkpoint(run_dir: Path) -> Path | None:
    """``last.ckpt``, or ``best.ckpt`` with a warning if ``last.ckpt`` is damaged (read through ``read_checkpoint``);
    ``None`` (start again) for a run that was stopped before its first checkpoint.

    A checkpoint that holds pickled objects is refused, not skipped: someone put it there.
    """
    import logging
    import pickle

    # exists(), not is_file(): an FSDP sharded checkpoint is a folder
    candidates = [run_dir / name for name in (LAST_CKPT, BEST_CKPT) if (run_dir / name).exists()]
    if not candidates:  # killed before its first checkpoint: nothing is lost by starting again
        logging.getLogger(__name__).warning("resume=%s: no checkpoint yet; the run starts again.", run_dir)
        return None
    problems = []
    for ckpt in candidates:
        try:
            read_checkpoint(ckpt)
            return ckpt
        except ModelLoadError as err:
            if isinstance(err.__cause__, pickle.UnpicklingError):
                raise
            problems.append(str(err))
            logging.getLogger(__name__).warning("resume: %s; trying the previous good checkpoint.", err)
    raise DataFileError(
        f"resume={run_dir}: no checkpoint of the run could be loaded ({'; '.join(problems)}). Start the run "
        "again in a new folder (without resume=)."
    )


def resume_argv(argv: list[str]) -> list[str]:
    """Rewrite ``resume=<run folder> [overrides]`` to compose that run's saved config in that folder.

    The saved ``.hydra/config.yaml`` is the config, the run folder is the output folder, and Hydra writes no new
    ``.hydra`` files there, so the record of the original overrides stays as it was.
    """
    values = [a.split("=", 1)[1] for a in argv if a.startswith("resume=")]
    if not values or values[-1].lower() in ("", "null", "true", "false"):
        return argv  # resume=true is the sweep variant, handled in the job (ftlab.runs.jobs)
    if "-m" in argv or "--multirun" in argv:
        return _resume_sweep_argv(argv, values[-1])
    run_dir = Path(values[-1]).expanduser().resolve()
    config = run_dir / CONFIG_FILE
    at = argv.index("--config-path") + 1 if "--config-path" in argv else len(argv)
    if at < len(argv) and argv[at] == str(config.parent):
        return argv  # rewritten already: a rank that Lightning's DDP/FSDP launcher started with this command line
    if not config.is_file():
        raise DataFileError(f"resume={values[-1]}: {config} does not exist; give the folder of an ftlab run.")
    rest = resume_run_overrides(run_dir, config, [a for a in argv if not a.startswith("resume=")])
    return [
        "--config-path",
        str(config.parent),
        "--config-name",
        "config",
        f"hydra.run.dir={run_dir}",
        "hydra.output_subdir=null",
        f"resume={run_dir}",
        *rest,
    ]


def refuse_taken_run_dir(argv: list[str]) -> None:
    """``hydra.run.dir=<a finished run>`` would let Hydra rewrite that run's ``.hydra/`` files: refuse it up front."""
    if any(a.startswith("resume=") and a not in ("resume=null", "resume=") for a in argv):
        return
    for arg in argv:
        if arg.startswith("hydra.run.dir="):
            check_fresh(Path(arg.split("=", 1)[1]).expanduser())


def _resume_sweep_argv(argv: list[str], value: str) -> list[str]:
    """``-m ... resume=<sweep folder>`` is ``-m ... hydra.sweep.dir=<sweep folder> resume=true``."""
    sweep_dir = Path(value).expanduser().resolve()
    if not (sweep_dir / MULTIRUN_FILE).is_file():
        raise DataFileError(
            f"resume={value} with -m: {sweep_dir / MULTIRUN_FILE} does not exist; give the folder of an ftlab "
            "sweep (outputs/multirun/<name>_<time>), and the same sweep overrides as the first time."
        )
    rest = [a for a in argv if not a.startswith("resume=")]
    check_sweep_choices(sweep_dir, sweep_dir / MULTIRUN_FILE, rest)
    # -m first: Hydra's parser takes one run of overrides, so "a=1 -m b=2" (resume= added after -m) is refused
    flags = [a for a in rest if a in ("-m", "--multirun")]
    return [*flags, *(a for a in rest if a not in flags), f"hydra.sweep.dir={sweep_dir}", "resume=true"]


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def is_rank_zero() -> bool:
    """Whether this process is the first rank (or the only one); ranks launched per process carry env variables."""
    return all(os.environ.get(k, "0") == "0" for k in ("LOCAL_RANK", "RANK", "SLURM_PROCID"))


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """Write atomically: a reader (``ftlab-report``, a resumed sweep) never sees half a file. Rank 0 only."""
    if not is_rank_zero():
        return  # under ddp every rank runs train(); one record per run
    text = json.dumps({k: _plain(v) for k, v in metrics.items()}, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text), point="metrics")


def read_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise DataFileError(f"{run_dir} has no {METRICS_FILE}: the run did not finish.")
    return json.loads(path.read_text())


def user_error(err: BaseException) -> FtlabError | None:
    """The :class:`FtlabError` behind ``err`` (Hydra's ``instantiate`` wraps what constructors raise), if any."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, FtlabError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def exit_on_user_error(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``; a user error (also one wrapped by Hydra) is printed as one paragraph and exits with status 2.

    Anything else is a bug and keeps its traceback.
    """
    try:
        return fn(*args)
    except Exception as err:
        user = user_error(err)
        if user is None:
            raise
        print_error(user)
        sys.exit(2)


def print_error(err: BaseException) -> None:
    print(f"\nftlab: error: {err}\n", file=sys.stderr)
