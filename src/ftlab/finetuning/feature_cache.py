"""Frozen layers computed once: a linear probe (``finetune=head_only``) trains its head on cached features.

When the whole backbone is frozen and deterministic for every epoch of the run, its output for an example never
changes, so :func:`maybe_cache_features` computes the pooled features of every example of every split once (eval
mode, no grad), keeps them in memory and on disk, and gives the trainer a data module whose batches are
``{"features": (B, H), "labels": (B,)}``; :class:`~ftlab.models.module.ClassificationModule` sends such batches
straight to the head. The training batches are the same examples in the same order as without the cache (the
text data module's own sampler, buckets included), so metrics match the uncached run up to floating point.

The disk key covers the backbone (class, pooling and every weight), the data (token ids, labels, split sizes)
and the preprocessing (tokenizer/max length through the ids; the collator's padding), so a stale entry is never
used. Entries are written atomically and the folder is trimmed to ``max_gb``, oldest first.

Conditions (else a log line says why and training runs uncached): every backbone group frozen at every epoch, no
trainable parameter inside the backbone (PEFT adapters), frozen groups fully in eval mode (``frozen_dropout`` and
``train_bn`` off), and a text data module (tokenised once, no augmentation). Extension points: image data modules
(cache when ``augment=none``, keyed by the pixel arrays) and a partly frozen backbone (``freeze_bottom``: cache the
hidden states after group k and run only the groups above it, which needs a backbone API such as
``forward_from(k, hidden, mask)``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ftlab.finetuning.groups import HEAD

log = logging.getLogger(__name__)


class FeatureDataset(Dataset):
    """Cached features and labels of one split."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"features": self.features[index], "labels": self.labels[index]}


class CachedFeatureDataModule(pl.LightningDataModule):
    """The wrapped text data module's splits as cached features; its training sampler (same batches) is reused."""

    def __init__(self, source: Any, features: dict[str, FeatureDataset]):
        super().__init__()
        self.source, self.features = source, features

    def _loader(self, split: str, train: bool) -> DataLoader:
        dataset = self.features[split]
        if train:
            self.source.trainer = self.trainer  # the sampler reads the epoch and DDP rank from it
            sampler = self.source._train_sampler(self.source.datasets["train"])
        return DataLoader(
            dataset,
            batch_size=self.source.batch_size if train else self.source.eval_batch_size,
            sampler=sampler if train else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def __getattr__(self, name: str) -> Any:  # num_classes, label_map, ... of the wrapped module
        source = self.__dict__.get("source")
        if source is None:
            raise AttributeError(name)
        return getattr(source, name)


def why_not(module: Any, datamodule: Any, max_epochs: int) -> str | None:
    """The reason the backbone's features cannot be cached for this run, or None when they can."""
    from ftlab.data.text import TextClassificationDataModule

    policy, backbone_groups = module.policy, [n for n in module.group_names if n != HEAD]
    epochs = range(max(1, min(max_epochs, 1000)) if max_epochs and max_epochs > 0 else 1000)
    if any(policy.frozen(module.group_names, e) != set(backbone_groups) for e in epochs):
        return "the fine-tuning policy does not freeze every backbone group for the whole run"
    if policy.frozen_dropout or policy.train_bn:
        return "finetune.frozen_dropout/train_bn keep parts of the frozen backbone in train mode"
    if any(p.requires_grad for p in module.backbone.parameters()):
        return "the backbone has trainable parameters (e.g. PEFT adapters inside it)"
    if not isinstance(datamodule, TextClassificationDataModule):
        return "feature caching is implemented for text data modules only (images: see feature_cache.py)"
    return None


def cache_key(module: Any, datamodule: Any) -> str:
    """A digest of the backbone (class, pooling, weights), the data (ids, labels) and the preprocessing."""
    digest = hashlib.sha256()
    backbone = module.backbone
    digest.update(f"{type(backbone).__qualname__}|{getattr(backbone, 'pooling', '')}".encode())
    for name, tensor in backbone.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    collate = datamodule.collate
    digest.update(repr(sorted(vars(collate).items())).encode())
    for split in sorted(datamodule.datasets):
        dataset = datamodule.datasets[split]
        digest.update(split.encode())
        for array in (dataset.ids, dataset.offsets, dataset.type_ids, dataset.labels):
            if array is not None:
                digest.update(array.tobytes())
    return digest.hexdigest()[:32]


@torch.no_grad()
def _compute(backbone: torch.nn.Module, datamodule: Any) -> dict[str, FeatureDataset]:
    was_training = backbone.training
    backbone.eval()
    features = {}
    for split, dataset in datamodule.datasets.items():
        loader = DataLoader(dataset, batch_size=datamodule.eval_batch_size, collate_fn=datamodule.collate)
        outs, labels = [], []
        for batch in loader:
            outs.append(backbone(batch))  # (B, H)
            labels.append(batch["labels"])
        features[split] = FeatureDataset(torch.cat(outs), torch.cat(labels))
    backbone.train(was_training)
    return features


def _trim(folder: Path, max_bytes: float) -> None:
    entries = sorted(folder.glob("*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
    total = 0
    for path in entries:
        total += path.stat().st_size
        if total > max_bytes:
            path.unlink(missing_ok=True)


def maybe_cache_features(
    module: Any, datamodule: Any, max_epochs: int, cache_dir: str | None, max_gb: float = 2.0
) -> Any:
    """``datamodule`` wrapped to serve cached backbone features when allowed (see module docstring), else itself."""
    reason = why_not(module, datamodule, max_epochs)
    if reason is not None:
        log.info("Feature cache off: %s.", reason)
        return datamodule
    key = cache_key(module, datamodule)
    path = Path(cache_dir).expanduser() / "features" / f"{key}.pt" if cache_dir else None
    if path is not None and path.is_file():
        saved = torch.load(path, weights_only=True)
        features = {split: FeatureDataset(*saved[split]) for split in saved}
        os.utime(path)  # most recently used: trimmed last
        log.info("Feature cache: read the frozen backbone's features from %s.", path)
    else:
        features = _compute(module.backbone, datamodule)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            torch.save({s: (d.features, d.labels) for s, d in features.items()}, tmp)
            os.replace(tmp, path)  # atomic: jobs of a sweep may write the same entry
            _trim(path.parent, max_gb * 1e9)
        log.info("Feature cache: computed the frozen backbone's features once (key %s).", key)
    return CachedFeatureDataModule(datamodule, features)
