"""``ftlab-eval``: score a run's checkpoint on a split of its data (or of another data config).

    ftlab-eval run=<run folder> [split=test|validation|train] [ckpt=<file>] [data=<name> ... | +data.<key>=...]

Writes ``metrics.json`` (accuracy, macro/micro F1, macro precision/recall, loss), ``per_class.csv`` (precision,
recall, F1 and support per label name), ``confusion_matrix.csv`` and ``confusion_matrix.png`` into
``<run>/eval/<split>/``; the training files of the run are never touched. The headline metrics are computed with
the same torchmetrics definitions as training, so ``split=test`` on the best checkpoint reproduces the run's
``metrics.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
import torch
import torchmetrics
from omegaconf import DictConfig, OmegaConf
from torch.nn import functional as F

from ftlab.models.module import make_metrics
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


def collect(module: torch.nn.Module, loader: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, C) and labels (N,) of every example the loader yields, in order."""
    logits, labels = [], []
    for batch, out in rebuild.batches(module, loader, device):
        logits.append(out.float().cpu())
        labels.append(batch["labels"].cpu())
    return torch.cat(logits), torch.cat(labels)


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, names: list[str], label_smoothing: float
) -> dict[str, float]:
    """Training's metrics (``acc``, macro ``f1``/``precision``/``recall``) plus micro F1 and the mean loss."""
    preds = logits.argmax(-1)
    values = {k: float(v) for k, v in make_metrics(len(names))(preds, labels).items()}
    micro = torchmetrics.F1Score(task="multiclass", num_classes=len(names), average="micro")
    values["f1_micro"] = float(micro(preds, labels))
    values["loss"] = float(F.cross_entropy(logits, labels, label_smoothing=label_smoothing))
    return values


def per_class(preds: np.ndarray, labels: np.ndarray, names: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-label precision/recall/F1/support, and the confusion matrix (rows: true label, columns: predicted)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    ids = list(range(len(names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, preds, labels=ids, zero_division=0
    )
    report = pd.DataFrame(
        {"label": names, "precision": precision, "recall": recall, "f1": f1, "support": support}
    )
    matrix = pd.DataFrame(confusion_matrix(labels, preds, labels=ids), index=names, columns=names)
    matrix.index.name = "true \\ predicted"
    return report, matrix


def plot_confusion(matrix: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = 2.5 + 0.45 * len(matrix)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix.to_numpy(), cmap="Blues")
    ax.set_xticks(range(len(matrix)), matrix.columns, rotation=45, ha="right")
    ax.set_yticks(range(len(matrix)), matrix.index)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    peak = matrix.to_numpy().max() or 1
    for (i, j), count in np.ndenumerate(matrix.to_numpy()):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score ``cfg.run``'s checkpoint on ``cfg.split``; returns the metrics also written to ``metrics.json``."""
    if cfg.split not in SPLITS:
        raise ConfigError(f"split={cfg.split!r} is not one of {', '.join(SPLITS)}.")
    device = pick_device(cfg.device)
    run = rebuild.load_run(cfg.run, cfg.get("ckpt"))
    data = user_data(cfg)
    datamodule = rebuild.datamodule_for(run, data)
    module = run.module.to(device)
    logits, labels = collect(module, getattr(datamodule, SPLITS[cfg.split])(), device)
    default_dir = run.run_dir / "eval" / (cfg.split if data is None else f"other_data_{cfg.split}")
    out = Path(cfg.output_dir).expanduser() if cfg.get("output_dir") else default_dir
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"{cfg.split}/"
    if module.regression:
        values = {k: float(v) for k, v in make_metrics(1)(logits.squeeze(-1), labels.float()).items()}
        values["loss"] = float(F.mse_loss(logits.squeeze(-1), labels.float()))
    else:
        names = run.label_names or [str(i) for i in range(logits.shape[-1])]
        values = classification_metrics(logits, labels, names, run.module.hparams["label_smoothing"])
        report, matrix = per_class(logits.argmax(-1).numpy(), labels.numpy(), names)
        report.to_csv(out / "per_class.csv", index=False)
        matrix.to_csv(out / "confusion_matrix.csv")
        plot_confusion(matrix, out / "confusion_matrix.png", f"{run.run_dir.name} · {cfg.split}")
        print("\n" + report.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    metrics: dict[str, Any] = {prefix + k: v for k, v in values.items()}
    metrics.update(examples=len(labels), checkpoint=str(run.ckpt_path), split=cfg.split)
    folder.write_metrics(out / folder.METRICS_FILE, metrics)
    shown = "\n".join(f"  {k:<20} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    print(
        f"\nftlab eval: {len(labels)} {cfg.split} examples\n{shown}\n  written to          {out}\n",
        flush=True,
    )
    return metrics


@hydra.main(version_base="1.3", config_path=folder.CONF_DIR, config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    folder.exit_on_user_error(evaluate, cfg)


def main() -> None:
    """Console entry point (``ftlab-eval``)."""
    _hydra_main()


if __name__ == "__main__":
    main()
