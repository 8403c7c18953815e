"""Frozen layers computed once: a linear probe (``finetune=head_only``) trains its head on cached features.

When the whole backbone is frozen and deterministic for every epoch of the run, its output for an example never
changes, so :func:`maybe_cache_features` computes the pooled features of every example of every split once (eval
mode, no grad), keeps them in memory and on disk, and gives the trainer a data module whose batches are
``{"features": (B, H), "labels": (B,)}``; :class:`~ftlab.models.module.ClassificationModule` sends such batches
straight to the head. The training batches are the same examples in the same order as without the cache (the
text data module's own sampler, buckets included), so metrics match the uncached run up to floating point.

The disk key covers the backbone (class, pooling and every weight), the data (token ids or pixels, labels, split
sizes) and the preprocessing (tokenizer/max length through the ids; the collator's padding; the image transform),
so a stale entry is never used. Entries are written atomically and the folder is trimmed to ``max_gb``, oldest first.

Conditions (else a log line says why and training runs uncached): every backbone group frozen at every epoch, no
trainable parameter inside the backbone (PEFT adapters), frozen groups fully in eval mode (``frozen_dropout`` and
``train_bn`` off), and deterministic inputs: a text data module (tokenised once), or an image data module with
``data.augment=none`` (its key covers the pixels or the files' paths, sizes and times, the labels and the transform
with its input size and normalisation). A partly frozen backbone (``feature_cache=prefix`` with ``freeze_bottom``)
caches the hidden states after group k and runs only the groups above it: text backbones only (they have
``forward_until`` / ``forward_from``; a CNN's activation maps would not fit the memory budget anyway).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset

from ftlab.data.base import TensorDictDataModule
from ftlab.finetuning.groups import HEAD
from ftlab.models.backbones.contract import can_split
from ftlab.preemption import resume_sampler
from ftlab.tasks.base import IGNORE_INDEX
from ftlab.utils.devices import loader_settings, on_cuda, padded_width
from ftlab.utils.safe_files import atomic_write, read_cached_tensors

log = logging.getLogger(__name__)


class FeatureDataset(Dataset):
    """Cached features and labels of one split."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"features": self.features[index], "labels": self.labels[index]}


class HiddenStateDataset(Dataset):
    """Cached hidden states after a frozen prefix, stored flat: example i is ``hidden[offsets[i]:offsets[i+1]]``."""

    def __init__(
        self, hidden: torch.Tensor, offsets: torch.Tensor, labels: torch.Tensor, per_token: bool = False
    ):
        self.hidden, self.offsets, self.labels = hidden, offsets, labels
        self.per_token = per_token  # token-level tasks: labels stored flat like the hidden states

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        labels = self.labels[start:end] if self.per_token else self.labels[index]
        return {"hidden_states": self.hidden[start:end], "labels": labels}


class HiddenStateCollator:
    """Pads cached hidden states (T_i, H) to the batch's longest; ``start_group`` tells the module where to go on."""

    def __init__(self, start_group: int, multiple: int = 1, cap: int | None = None, per_token: bool = False):
        self.start_group, self.per_token = (
            start_group,
            per_token,
        )  # per_token: labels (T_i,) padded like states
        # the longest rounded up to a multiple, at most cap (data.pad_to_multiple_of on a GPU)
        self.multiple, self.cap = multiple, cap

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = padded_width(max(len(item["hidden_states"]) for item in items), self.multiple, self.cap)
        size = items[0]["hidden_states"].shape[-1]
        hidden = torch.zeros(len(items), width, size)
        mask = torch.zeros(len(items), width, dtype=torch.long)
        for row, item in enumerate(items):
            hidden[row, : len(item["hidden_states"])] = item["hidden_states"]
            mask[row, : len(item["hidden_states"])] = 1
        if (
            self.per_token
        ):  # labels (T_i,): padded like the hidden states (a multi-hot (C,) row is not per token)
            labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
            for row, item in enumerate(items):
                labels[row, : len(item["labels"])] = item["labels"]
        else:
            labels = torch.stack([item["labels"] for item in items])
        return {
            "hidden_states": hidden,
            "attention_mask": mask,
            "labels": labels,
            "start_group": torch.tensor(self.start_group),
        }


class CachedFeatureDataModule(TensorDictDataModule):
    """The wrapped data module's splits as cached features; its public training sampler (same batches) is reused.

    Only the data module's public API is used (``train_sampler``, ``collator``, loader settings, labels).
    """

    def __init__(self, source: Any, features: dict[str, Any], collate: Any = None):
        super().__init__()
        self.source, self.features, self.collate = source, features, collate
        self.task, self.modality = source.task, source.modality

    @property
    def label_map(self) -> Any:
        return self.source.label_map

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def label_names(self) -> list[str] | None:
        return self.source.label_names

    def _loader(self, split: str, train: bool) -> DataLoader:
        dataset = self.features[split]
        if train:
            self.source.trainer = self.trainer  # the sampler reads the epoch and DDP rank from it
            sampler = self.source.train_sampler(self.source.datasets["train"])
            sampler = resume_sampler(sampler, self.trainer, self.source.batch_size)  # mid-epoch resume
        collate = self.collate
        if isinstance(collate, HiddenStateCollator):  # widths rounded as the text module's batches would be
            text = self.source.collator(cuda=on_cuda(self.trainer))
            collate = HiddenStateCollator(collate.start_group, text.multiple, text.cap, collate.per_token)
        return DataLoader(
            dataset,
            batch_size=self.source.batch_size if train else self.source.eval_batch_size,
            sampler=sampler if train else None,
            collate_fn=collate,
            **loader_settings(self.source.num_workers, self.source.pin_memory, self.trainer),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()


def frozen_prefix(module: Any, max_epochs: int) -> tuple[int, str | None]:
    """``(k, None)`` when the bottom ``k`` backbone groups are frozen and deterministic for the whole run, else
    ``(0, reason)``; ``k`` equal to the number of backbone groups means the whole backbone."""
    policy, names = module.policy, module.group_names
    if getattr(module, "adversarial", None) is not None:
        return 0, "adversarial training perturbs the backbone's inputs every step"
    backbone_groups = [n for n in names if n != HEAD]
    epochs = range(max_epochs if max_epochs and 0 < max_epochs < 1000 else 1000)
    frozen = policy.frozen(names, 0)
    k = len(frozen)
    if frozen != set(backbone_groups[:k]):
        return 0, "the frozen groups are not a bottom prefix of the backbone"
    if k == 0 or any(policy.frozen(names, e) != frozen for e in epochs):
        return 0, "the fine-tuning policy freezes no backbone group for the whole run"
    if policy.frozen_dropout or policy.train_bn:
        return 0, "finetune.frozen_dropout/train_bn keep parts of the frozen backbone in train mode"
    frozen_params = [p for g in module.groups[:k] for _, p in g.params]
    if any(p.requires_grad for p in frozen_params):
        return 0, "the frozen groups hold trainable parameters (e.g. PEFT adapters inside them)"
    # per-token tasks cache every token's states: the hidden-state path even when k is all groups
    per_token = module.task.level == "token"
    if (k < len(backbone_groups) or per_token) and not can_split(module.backbone):
        return 0, f"the backbone cannot be run from layer group {k} (no forward_until/forward_from)"
    return k, None


def why_not(module: Any, datamodule: Any, max_epochs: int) -> str | None:
    """The reason the frozen prefix's outputs cannot be cached for this run, or None when they can."""
    _, reason = frozen_prefix(module, max_epochs)
    # the data module says whether its inputs are the same every epoch (no augmentation) and can be keyed
    return reason or datamodule.feature_cache_blocker()


def cache_key(module: Any, datamodule: Any, k: int | None = None) -> str:
    """A digest of the frozen prefix (class, pooling, its weights, ``k``), the data (ids or pixels, labels) and the
    preprocessing (collator, image transform)."""
    digest = hashlib.sha256()
    backbone = module.backbone
    k = len([n for n in module.group_names if n != HEAD]) if k is None else k
    digest.update(f"{type(backbone).__qualname__}|{getattr(backbone, 'pooling', '')}|{k}".encode())
    for group in module.groups[:k]:
        for part in group.modules:
            for name, tensor in part.state_dict().items():
                digest.update(f"{group.name}.{name}".encode())
                digest.update(
                    tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                )
    collate = datamodule.collate
    digest.update(repr(sorted(vars(collate).items()) if collate is not None else None).encode())
    for split in sorted(datamodule.datasets):
        digest.update(split.encode())
        datamodule.datasets[split].digest(digest)  # what the split's examples are made of
    return digest.hexdigest()[:32]


@torch.no_grad()
def _compute(
    backbone: torch.nn.Module,
    datamodule: Any,
    k: int,
    whole: bool,
    device: torch.device | None = None,
    per_token: bool = False,
) -> dict[str, Any]:
    """Per split: pooled features (N, H) of the whole backbone, or the hidden states after group k, flat (with
    ``per_token`` labels (token-level tasks) trimmed and stored flat like the states).

    Computed on ``device`` (the trainer's: a GPU run computes its cache on the GPU, in fp32) and kept on the CPU.
    """
    was_training = backbone.training
    home = next(backbone.parameters()).device
    device = device or home
    backbone.eval().to(device)
    out: dict[str, Any] = {}
    # on a GPU, text widths rounded up as in training (few shapes; padding is masked, and trimmed below)
    collate = datamodule.collator(cuda=device.type == "cuda")
    for split, dataset in datamodule.datasets.items():
        loader = DataLoader(dataset, batch_size=datamodule.eval_batch_size, collate_fn=collate)
        parts, labels = [], []
        for batch in loader:
            batch = {key: value.to(device) for key, value in batch.items()}
            if whole:
                labels.append(batch["labels"].cpu())
                parts.append(backbone(batch).cpu())  # (B, H)
            else:
                hidden = cast(Any, backbone).forward_until(k, batch).cpu()  # (B, T, H)
                lengths = batch["attention_mask"].sum(1).tolist()  # keep each example's real tokens
                parts += [h[:n] for h, n in zip(hidden, lengths, strict=True)]
                tags = batch["labels"].cpu()  # (B,) or per token (B, T): trimmed like the states
                labels += [t[:n] for t, n in zip(tags, lengths, strict=True)] if per_token else [tags]
        lengths = torch.tensor([0] + [len(p) for p in parts]) if not whole else None
        out[split] = (
            (torch.cat(parts), torch.cat(labels))
            if whole
            else (torch.cat(parts), torch.cumsum(cast(torch.Tensor, lengths), 0), torch.cat(labels))
        )
    backbone.train(was_training).to(home)
    return out


def _trim(folder: Path, max_bytes: float) -> None:
    entries = sorted(folder.glob("*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
    total = 0
    for path in entries:
        total += path.stat().st_size
        if total > max_bytes:
            path.unlink(missing_ok=True)


def _load_or_compute(
    module: Any,
    datamodule: Any,
    k: int,
    whole: bool,
    path: Path | None,
    max_gb: float,
    device: torch.device | None = None,
):
    saved = read_cached_tensors(path) if path is not None else None  # weights_only; damaged: recomputed
    if saved is not None:
        os.utime(path)  # type: ignore[arg-type]  # most recently used: trimmed last
        log.info("Feature cache: read the frozen layers' outputs from %s.", path)
        return saved
    saved = _compute(module.backbone, datamodule, k, whole, device, module.task.level == "token")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # atomic: jobs of a sweep may write the same entry
        atomic_write(path, lambda tmp: torch.save(saved, tmp), point="features")
        _trim(path.parent, max_gb * 1e9)
    log.info("Feature cache: computed the frozen layers' outputs once (%d groups, key %s).", k, path)
    return saved


def maybe_cache_features(
    module: Any,
    datamodule: Any,
    max_epochs: int,
    cache_dir: str | None,
    max_gb: float = 2.0,
    prefix: bool = False,
    device: torch.device | None = None,
) -> Any:
    """``datamodule`` wrapped to serve the frozen prefix's cached outputs when allowed, else itself.

    ``prefix``: also cache a partly frozen backbone (``feature_cache=prefix``). Opt-in: on MiniLM with k=4 the
    cached step computed 1.3x faster in isolation, but the benchmark measured the cached run slower (docs/speed.md).
    """
    reason = why_not(module, datamodule, max_epochs)
    k, _ = frozen_prefix(module, max_epochs)
    per_token = module.task.level == "token"
    all_groups = k == len([n for n in module.group_names if n != HEAD])
    whole = all_groups and not per_token  # pooled features; per-token tasks cache the states of every token
    if reason is None and not all_groups and not prefix:
        reason = "caching a partly frozen backbone is opt-in (feature_cache=prefix)"
    if reason is None and not whole:
        tokens = sum(len(d.ids) for d in datamodule.datasets.values())
        if tokens * module.backbone.out_features * 4 > max_gb * 1e9:
            reason = f"the hidden states of {tokens} tokens would exceed feature_cache max {max_gb} GB"
    if reason is not None:
        log.info("Feature cache off: %s.", reason)
        return datamodule
    key = cache_key(module, datamodule, k)
    path = Path(cache_dir).expanduser() / "features" / f"{key}.pt" if cache_dir else None
    saved = _load_or_compute(module, datamodule, k, whole, path, max_gb, device)
    if whole:
        return CachedFeatureDataModule(datamodule, {s: FeatureDataset(*v) for s, v in saved.items()})
    datasets = {s: HiddenStateDataset(v[0], v[1], v[2], per_token=per_token) for s, v in saved.items()}
    return CachedFeatureDataModule(datamodule, datasets, HiddenStateCollator(k, per_token=per_token))
