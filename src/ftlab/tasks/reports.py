"""Report files shared by the tasks' evaluators: per-label tables and the confusion-matrix plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ftlab.utils.safe_files import save_figure


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
    save_figure(fig, path, dpi=120)
    plt.close(fig)
