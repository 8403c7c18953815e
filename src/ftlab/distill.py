"""Knowledge distillation (Hinton et al. 2015): a student learns from a finished ftlab run's softened outputs.

``distill.teacher=<run folder>`` rebuilds the teacher with :func:`ftlab.runs.rebuild.load_run` (weights-only
checkpoint), frozen and in eval mode; its task and label list must be the student's. The student's training loss is
``alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))``; the T^2
keeps the soft term's gradients on the scale of the hard term's as T changes. Validation and test use the task's
own loss and metrics.

The teacher never changes, so its logits for the training split are computed once before fit (like the frozen-feature
cache, :mod:`ftlab.finetuning.feature_cache`), kept on disk under ``paths.cache_dir/teacher/<key>.pt`` (key: the
teacher's checkpoint bytes and the teacher-encoded training inputs; written atomically, read weights-only) and
served with each example (``teacher_logits`` in the batch): a student step runs no teacher forward. The teacher
encodes the raw training texts with its own tokenizer, so the student may be any backbone. Without a cache
(``distill.cache=false``, or augmented training data whose texts change every epoch) the teacher runs on each
training batch, which needs the student's tokenizer to be the teacher's.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ftlab.data.teacher import DistillDataModule, read_transfer, with_transfer
from ftlab.utils.errors import ConfigError
from ftlab.utils.safe_files import atomic_write, read_cached_tensors

log = logging.getLogger(__name__)

TASKS = ("classification",)  # softmax outputs: what the KL term is defined on


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, hard: torch.Tensor, alpha: float, temperature: float
) -> torch.Tensor:
    """``alpha * hard + (1 - alpha) * T^2 * KL(p_teacher^T || p_student^T)``, KL averaged over the batch.

    Args:
        student, teacher: logits (B, C).
        hard: the task's loss of ``student`` on the labels (a scalar).
    """
    if alpha >= 1.0:  # plain training: the soft term is not computed at all
        return hard
    t = float(temperature)
    soft = F.kl_div(
        F.log_softmax(student.float() / t, dim=-1),
        F.log_softmax(teacher.float() / t, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return alpha * hard + (1.0 - alpha) * t * t * soft


class Distiller:
    """The student's training loss; the teacher runs only when the batch has no cached ``teacher_logits``.

    A plain object (not an ``nn.Module``), so the teacher is no part of the student's state dict or optimizer.
    """

    def __init__(self, teacher: torch.nn.Module, alpha: float = 0.5, temperature: float = 2.0):
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(
                f"distill.alpha={alpha} must be between 0 and 1 (the weight of the label loss)."
            )
        if temperature <= 0:
            raise ConfigError(f"distill.temperature={temperature} must be positive (1: unsoftened outputs).")
        self.teacher, self.alpha, self.temperature = teacher, float(alpha), float(temperature)
        self.teacher_forwards = 0  # batches the teacher ran on during training (0 with the cache)

    @torch.no_grad()
    def teacher_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The frozen teacher on a batch encoded for it (no cache)."""
        device = batch["labels"].device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        self.teacher_forwards += 1
        return self.teacher(batch)

    def loss(self, module: Any, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The distillation loss of the student's ``logits`` on a training batch; transfer-set rows (``labelled``
        false) have the soft term only."""
        labelled = batch.get("labelled")
        if labelled is None:
            hard = module.loss(logits, batch["labels"])
        elif bool(labelled.any()):  # the label loss's mean over the labelled rows only
            hard = module.loss(logits[labelled], batch["labels"][labelled])
        else:
            hard = logits.sum() * 0.0
        if self.alpha >= 1.0:
            return hard
        teacher = batch.get("teacher_logits")
        if teacher is None:
            teacher = self.teacher_logits(batch)
        return distillation_loss(logits, teacher, hard, self.alpha, self.temperature)


def load_teacher(run_dir: str | Path, datamodule: Any) -> Any:
    """The teacher run (:class:`~ftlab.runs.rebuild.LoadedRun`) frozen in eval mode; its task and labels checked."""
    from ftlab.runs.rebuild import load_run
    from ftlab.utils.errors import DataFileError

    try:
        run = load_run(run_dir)
    except DataFileError as err:  # said in the key the user typed
        raise ConfigError(f"distill.teacher={run_dir}: {err}") from None
    teacher = run.module
    task, names = teacher.task.name, run.label_names
    if task not in TASKS or datamodule.task != task:
        raise ConfigError(
            f"distill.teacher={run_dir} is a {task} run and the student's data.task is {datamodule.task}: "
            f"distillation needs both to be {' or '.join(TASKS)} (softmax outputs over the same labels)."
        )
    if list(names or []) != list(datamodule.label_names or []):
        raise ConfigError(
            f"distill.teacher={run_dir} was trained on the labels {names}, the student's data has the labels "
            f"{datamodule.label_names} (same names, same order needed). Distil on the teacher's data, or fix the "
            "student's labels with data.labels=[...] in the teacher's order."
        )
    teacher.requires_grad_(False)
    teacher.eval()
    return run


def _teacher_items(run: Any, datamodule: Any, transfer: list[str]) -> tuple[list[dict[str, Any]], Any]:
    """The training split (then the transfer texts) encoded for the teacher (its own tokenizer and max length) and
    the teacher's collator."""
    from ftlab.runs.rebuild import datamodule_for

    if not hasattr(datamodule, "raw_inputs"):
        raise ConfigError(
            f"distill.cache=true needs the training split's raw inputs, which {type(datamodule).__name__} does "
            "not give (text data modules do). Set distill.cache=false to run the teacher on each batch."
        )
    texts, pairs = datamodule.raw_inputs("train")
    teacher_data = datamodule_for(run, setup=False)
    items = teacher_data.encode(texts, pairs) + (teacher_data.encode(transfer) if transfer else [])
    return items, teacher_data.collator(cuda=False)


def _cache_key(ckpt_path: Path, items: list[dict[str, Any]]) -> str:
    digest = hashlib.sha256()
    # the teacher's weights, byte for byte (an FSDP sharded checkpoint is a folder: each of its files)
    files = sorted(p for p in ckpt_path.rglob("*") if p.is_file()) if ckpt_path.is_dir() else [ckpt_path]
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    for item in items:  # the teacher's own token ids of every training example, in order
        for key in ("input_ids", "token_type_ids"):
            if key in item:
                digest.update(key.encode())
                digest.update(np.ascontiguousarray(item[key]).tobytes())
    return digest.hexdigest()[:32]


@torch.no_grad()
def compute_teacher_logits(
    teacher: torch.nn.Module, items: list[dict[str, Any]], collate: Any, batch_size: int, device: torch.device
) -> torch.Tensor:
    """The teacher's logits (N, C) for ``items`` in order, on ``device``, kept on the CPU."""
    home = next(teacher.parameters()).device
    teacher.to(device)
    parts = []
    for start in range(0, len(items), batch_size):
        batch = collate(items[start : start + batch_size])
        parts.append(teacher({k: v.to(device) for k, v in batch.items()}).float().cpu())
    teacher.to(home)
    return torch.cat(parts)


def attach_teacher(
    distill: Any, module: Any, datamodule: Any, cache_dir: str | None, device: torch.device | None = None
) -> Any:
    """Give ``module`` its :class:`Distiller` from ``distill.teacher``; returns the data module to train on (with
    the teacher's logits cached per training example when ``distill.cache``)."""
    run = load_teacher(distill.teacher, datamodule)
    distiller = Distiller(run.module, distill.get("alpha", 0.5), distill.get("temperature", 2.0))
    module.distiller = distiller
    blocker = datamodule.feature_cache_blocker()
    transfer = (
        read_transfer(distill.transfer, distill.get("transfer_column", "text"))
        if distill.get("transfer")
        else []
    )
    if transfer and (blocker is not None or not distill.get("cache", True)):
        raise ConfigError(
            f"distill.transfer={distill.transfer} needs the teacher's outputs cached (distill.cache=true, no "
            f"data.text_augment{'' if blocker is None else ': ' + blocker})."
        )
    if not distill.get("cache", True) or blocker is not None:
        student, teacher = module.backbone.preprocessing, run.module.backbone.preprocessing
        if student != teacher:
            raise ConfigError(
                f"distill.teacher={distill.teacher}: without cached teacher outputs ({blocker or 'distill.cache='}"
                f"{'' if blocker else 'false'}) the teacher runs on the student's batches, but their inputs "
                f"differ (student {student}, teacher {teacher}). Use the teacher's backbone family for the "
                "student, or turn the cache on (distill.cache=true, no data.text_augment)."
            )
        log.info(
            "Distillation: the teacher runs on every training batch (%s).", blocker or "distill.cache=false"
        )
        return datamodule
    train = with_transfer(datamodule, transfer) if transfer else None  # checked before the teacher's pass
    items, collate = _teacher_items(run, datamodule, transfer)
    key = _cache_key(run.ckpt_path, items)
    path = Path(cache_dir).expanduser() / "teacher" / f"{key}.pt" if cache_dir else None
    logits = read_cached_tensors(path) if path is not None else None  # weights_only; damaged: recomputed
    if logits is None:
        logits = compute_teacher_logits(
            run.module, items, collate, datamodule.eval_batch_size, device or torch.device("cpu")
        )
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: torch.save(logits, tmp), point="teacher")
        log.info("Distillation: the teacher's logits computed once for %d training examples.", len(logits))
    else:
        log.info("Distillation: the teacher's logits read from %s.", path)
    return DistillDataModule(datamodule, logits, train)
