"""``ftlab-eval``: score a run's checkpoint on a split of its data (or of another data config).

    ftlab-eval run=<run folder> [split=test|validation|train] [ckpt=<file>] [data=<name> ... | +data.<key>=...]
    ftlab-eval run=<run folder> attack=pgd attack.epsilon=[0.05,0.1]     # clean vs attacked (ftlab.robustness)

Writes ``metrics.json`` and the task's report into ``<run>/eval/<split>/`` (classification: accuracy, macro/micro
F1, macro precision/recall, loss, ``per_class.csv``, ``confusion_matrix.csv`` and ``.png``; other tasks: see
:mod:`ftlab.tasks`); the training files of the run are never touched. The headline metrics are computed with
the same torchmetrics definitions as training, so ``split=test`` on the best checkpoint reproduces the run's
``metrics.json``.

Inputs that cannot be read (an image that is cut off or a decompression bomb, a line of a table that is not UTF-8)
are left out one by one: the rest is evaluated and written, ``skipped.csv`` lists each with its reason, and the
command ends with one paragraph naming them (exit status 2) only then (:mod:`ftlab.data.unreadable`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ftlab.data import unreadable
from ftlab.runs import folder, rebuild
from ftlab.utils.errors import ConfigError

SPLITS = {"train": "train_dataloader", "validation": "val_dataloader", "test": "test_dataloader"}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") or (name == "cuda" and not torch.cuda.is_available()):
        raise ConfigError(f"device={name!r}: use cpu, auto, or cuda (only where a CUDA device is available).")
    return torch.device(name)


def user_data(cfg: DictConfig) -> DictConfig | None:
    """The ``data`` node given on the command line, unresolved (``${seed}`` resolves against the run's config)."""
    node = cfg.get("data")
    return DictConfig(OmegaConf.to_container(node, resolve=False)) if node else None


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score ``cfg.run``'s checkpoint on ``cfg.split``; returns the metrics also written to ``metrics.json``."""
    if cfg.split not in SPLITS:
        raise ConfigError(f"split={cfg.split!r} is not one of {', '.join(SPLITS)}.")
    device = pick_device(cfg.device)
    run = rebuild.load_run(cfg.run, cfg.get("ckpt"))
    data = user_data(cfg)
    with unreadable.skipping() as skipped:  # (input, reason): reported, the others evaluated, exit status 2
        datamodule = rebuild.datamodule_for(run, data)
    if cfg.get("attack") is not None:  # clean vs attacked metrics: <run>/eval/<split>_attack_<name>/
        from ftlab.robustness import evaluate_attack

        return evaluate_attack(cfg, run, datamodule, device, skipped)
    module = run.module.to(device)
    default_dir = run.run_dir / "eval" / (cfg.split if data is None else f"other_data_{cfg.split}")
    out = Path(cfg.output_dir).expanduser() if cfg.get("output_dir") else default_dir
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"{cfg.split}/"
    # the task's evaluator: training's metric definitions over the split, plus its report files
    evaluator = module.task.evaluator()
    examples = 0
    loader = unreadable.skipping_loader(getattr(datamodule, SPLITS[cfg.split])(), skipped)
    for batch, logits in rebuild.batches(module, loader, device):
        evaluator.add(logits, batch["labels"])
        examples += len(batch["labels"])
    values = evaluator.finish(out, f"{run.run_dir.name} · {cfg.split}")
    metrics: dict[str, Any] = {prefix + k: v for k, v in values.items()}
    metrics.update(examples=examples, checkpoint=str(run.ckpt_path), split=cfg.split)
    folder.write_metrics(out / folder.METRICS_FILE, metrics)
    shown = "\n".join(f"  {k:<20} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    print(
        f"\nftlab eval: {examples} {cfg.split} examples\n{shown}\n  written to          {out}\n",
        flush=True,
    )
    record = out / "skipped.csv"
    if skipped:
        raise unreadable.report_skipped(skipped, record, f"{examples} evaluated (written to {out})")
    record.unlink(missing_ok=True)  # an earlier evaluation's record
    return metrics


def main() -> None:
    """``python -m ftlab.evaluate``, the same as ``ftlab-eval``: ftlab.cli checks the config first."""
    from ftlab import cli

    cli.evaluate()


if __name__ == "__main__":
    main()
