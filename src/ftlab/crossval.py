"""Out-of-fold predictions of a k-fold cross-validation sweep, and the likely label errors they reveal.

Each fold of ``-m data.folds=5 data.fold='range(5)'`` writes its validation fold's predictions (with the class
probabilities of its best checkpoint) to ``oof_predictions.csv`` in its run folder. The folds' validation sets
cover the training pool exactly once, so the files together hold one held-out prediction per example:

    python -c "from ftlab.crossval import label_issues; print(label_issues('outputs/multirun/<sweep>'))"

ranks the examples whose given label the other folds' models doubt most (cleanlab's ``find_label_issues``;
``pip install 'ftlab[cleanlab]'``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from ftlab.runs import folder
from ftlab.utils.errors import ConfigError, DataFileError
from ftlab.utils.safe_files import write_frame

log = logging.getLogger(__name__)

PROB_PREFIX = "prob/"


class OutOfFoldPredictions(Callback):
    """After testing (the best checkpoint's weights are loaded), write the validation fold's predictions.

    Does nothing without ``data.folds``. Rank 0 predicts the whole fold on its own: no collective calls, so it
    works the same under every strategy.
    """

    def on_test_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        datamodule: Any = trainer.datamodule  # type: ignore[attr-defined]
        if getattr(datamodule, "folds", None) is None or not trainer.is_global_zero:
            return
        if getattr(pl_module, "task", None) is None or pl_module.task.name != "classification":
            log.warning("Out-of-fold predictions are written for single-label classification only.")
            return
        frame = predict_fold(pl_module, datamodule.val_dataloader(), pl_module.task.label_names)
        frame.insert(0, "index", np.asarray(datamodule.fold_index))
        frame.insert(1, "fold", datamodule.fold)
        write_frame(Path(trainer.default_root_dir) / folder.OOF_FILE, frame, index=False)


def predict_fold(module: Any, loader: Any, names: list[str] | None) -> pd.DataFrame:
    """``label``, ``predicted`` and ``prob/<class>`` per example of ``loader`` (in its order)."""
    was_training = module.training
    module.eval()
    labels, probs = [], []
    with torch.inference_mode():
        for batch in loader:
            batch = {k: v.to(module.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            probs.append(torch.softmax(module(batch).float(), dim=-1).cpu())
            labels.append(batch["labels"].cpu())
    module.train(was_training)
    prob = torch.cat(probs).numpy()
    names = names or [str(i) for i in range(prob.shape[1])]
    frame = pd.DataFrame({"label": torch.cat(labels).numpy(), "predicted": prob.argmax(1)})
    for i, name in enumerate(names):
        frame[f"{PROB_PREFIX}{name}"] = prob[:, i]
    return frame


def collect_oof(sweep: str | Path) -> pd.DataFrame:
    """The sweep's out-of-fold predictions in one table, by ``index`` (checked: each example exactly once)."""
    files = sorted(Path(sweep).expanduser().glob(f"*/{folder.OOF_FILE}"))
    if not files:
        raise DataFileError(
            f"{sweep} holds no */{folder.OOF_FILE}: give the folder of a finished k-fold sweep "
            "(ftlab-train -m data.folds=5 data.fold='range(5)' ...)."
        )
    frame = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    repeated = frame["index"].duplicated()
    if repeated.any():
        raise DataFileError(
            f"{sweep}: {int(repeated.sum())} examples have predictions from several runs (e.g. index "
            f"{int(frame['index'][repeated].iloc[0])}); collect one k-fold sweep of one setting and seed at a time."
        )
    return frame.sort_values("index").reset_index(drop=True)


def label_issues(sweep: str | Path, top: int | None = 20) -> pd.DataFrame:
    """The examples most likely mislabelled, most likely first (cleanlab's ``find_label_issues``)."""
    try:
        from cleanlab.filter import find_label_issues
    except ImportError as err:
        raise ConfigError(f"label_issues needs cleanlab ({err}): pip install 'ftlab[cleanlab]'.") from None

    frame = collect_oof(sweep)
    prob = frame[[c for c in frame.columns if c.startswith(PROB_PREFIX)]].to_numpy()
    # n_jobs=1: cleanlab's default forks a process pool, which can deadlock when forked from a process with live
    # threads (torch's, a joblib executor's: seen as a hung test); the out-of-fold table is small
    ranked = find_label_issues(
        frame["label"].to_numpy(), prob, return_indices_ranked_by="self_confidence", n_jobs=1
    )
    issues = frame.iloc[ranked][["index", "fold", "label", "predicted"]].copy()
    issues["label_prob"] = prob[ranked, frame["label"].to_numpy()[ranked]]
    return issues.reset_index(drop=True).head(top) if top else issues.reset_index(drop=True)
