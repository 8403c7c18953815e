"""``ftlab-eval run=<run> attack=<name>``: clean and attacked metrics of a run's checkpoint, side by side.

    ftlab-eval run=<run> attack=pgd attack.epsilon=[0.05,0.1,0.2]
    ftlab-eval run=<run> attack=char_noise attack.rate=[0.05,0.1]

Writes ``<run>/eval/<split>_attack_<name>/metrics.json`` (atomically): the clean metrics under their eval names
(``test/acc``, ...), the metrics at each strength under ``<name>@<strength>/test/acc``, ..., and the attack's
settings; prints the same as a table. Metrics are the task's own (training's torchmetrics definitions). Inputs that
cannot be read (a cut-off image, a line that is not UTF-8) are left out of every pass, named in ``skipped.csv``
and end the command with one paragraph, exit status 2, as a plain ``ftlab-eval`` does (``ftlab.data.unreadable``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from ftlab.data import unreadable
from ftlab.robustness.attacks import Attack, Outputs
from ftlab.runs import folder, rebuild
from ftlab.utils.errors import ConfigError
from ftlab.utils.safe_files import atomic_write

LOADERS = {"train": "train_dataloader", "validation": "val_dataloader", "test": "test_dataloader"}


def build_attack(node: DictConfig) -> Attack:
    """The attack of ``cfg.attack`` (``conf/attack/<name>.yaml``)."""
    try:
        attack = instantiate(node, _convert_="all")
    except InstantiationException as err:  # a constructor's ConfigError surfaces as itself
        user = folder.user_error(err)
        if user is None:
            raise
        raise user from None
    if not isinstance(attack, Attack):
        raise ConfigError(
            f"attack._target_={node.get('_target_')} builds a {type(attack).__name__}, not an ftlab.robustness "
            "attack; use one of conf/attack/ (fgsm, pgd, embedding_pgd, char_noise, word_deletion, synonyms)."
        )
    return attack


def score(task: Any, outputs: Outputs) -> tuple[dict[str, float], int]:
    """The task's headline metrics over ``(logits, labels)`` batches, and the number of examples."""
    evaluator, examples = task.evaluator(), 0
    for logits, labels in outputs:
        evaluator.add(logits, labels)
        examples += len(labels)
    return evaluator.headline(), examples


def evaluate_attack(
    cfg: DictConfig,
    run: rebuild.LoadedRun,
    datamodule: Any,
    device: torch.device,
    skipped: unreadable.Skipped | None = None,
) -> dict[str, Any]:
    """Clean metrics of ``cfg.split`` and the metrics under ``cfg.attack`` at each of its strengths.

    ``skipped``: inputs already left out while the data was read; the clean pass adds the examples it cannot read
    (the attacked passes leave out the same ones). Any of them raise the :class:`DataError` of
    :func:`unreadable.report_skipped` once the metrics are written.
    """
    skipped = [] if skipped is None else skipped
    attack = build_attack(cfg.attack)
    module = run.module.to(device).eval()
    attack.check(module, datamodule)
    split, prefix = cfg.split, f"{cfg.split}/"
    loader = unreadable.skipping_loader(getattr(datamodule, LOADERS[split])(), skipped)
    clean, examples = score(
        module.task, ((logits, b["labels"]) for b, logits in rebuild.batches(module, loader, device))
    )
    metrics: dict[str, Any] = {prefix + k: v for k, v in clean.items()}
    rows = [("clean", clean)]
    for value in attack.values:
        values, _ = score(module.task, attack.outputs(module, datamodule, split, value, device))
        rows.append((f"{attack.key}={value:g}", values))
        metrics.update({f"{attack.name}@{value:g}/{prefix}{k}": v for k, v in values.items()})
    metrics.update(
        attack=attack.name,
        **{attack.key: attack.values},
        **attack.settings(),
        examples=examples,
        checkpoint=str(run.ckpt_path),
        split=split,
    )
    out = (
        Path(cfg.output_dir).expanduser()
        if cfg.get("output_dir")
        else run.run_dir / "eval" / f"{split}_attack_{attack.name}"
    )
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(metrics, indent=2) + "\n"
    atomic_write(out / "metrics.json", lambda tmp: tmp.write_text(text))
    show(rows, f"{run.run_dir.name} · {split} · attack={attack.name} ({examples} examples)", out)
    record = out / "skipped.csv"
    if skipped:
        raise unreadable.report_skipped(skipped, record, f"{examples} evaluated (written to {out})")
    record.unlink(missing_ok=True)  # an earlier evaluation's record
    return metrics


def show(rows: list[tuple[str, dict[str, float]]], title: str, out: Path) -> None:
    """The clean and attacked metrics as a rich table on the console."""
    from rich.console import Console
    from rich.table import Table

    names = list(rows[0][1])
    table = Table(title=title)
    table.add_column("input")
    for name in names:
        table.add_column(name, justify="right")
    for label, values in rows:
        table.add_row(label, *(f"{values[n]:.4f}" for n in names))
    console = Console()
    console.print(table)
    console.print(f"written to {out / 'metrics.json'}")
