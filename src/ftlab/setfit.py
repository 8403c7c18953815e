"""SetFit-style few-shot learning (Tunstall et al. 2022), natively in Lightning: ``finetune=setfit``.

Stage 1 fine-tunes the sentence encoder (the run's backbone with its own pooling) contrastively on pairs of
labelled training examples: same label -> target cosine similarity 1, different labels -> 0, loss
``MSE(cos(u, v), target)`` (sentence-transformers' ``CosineSimilarityLoss``, what SetFit trains with). Stage 2 is
the run's ordinary fit with the policy's frozen backbone (``finetune=head_only``'s settings): the head learns on the
tuned body's features, computed once by the frozen-feature cache (:mod:`ftlab.finetuning.feature_cache`). SetFit
fits a logistic regression on frozen embeddings; a linear head trained with cross-entropy on frozen features is
that model.

Stage 1 is its own ``pl.Trainer`` fit built from ``cfg.trainer`` (same accelerator, devices, precision) and the
run's loggers (``setfit/loss_step``, ``setfit/loss_epoch``). Its result, the tuned body, is written to the run
folder (``setfit_body.pt``) before stage 2 starts: a resumed run that finds it loads it and goes on with stage 2
from ``last.ckpt``; a run stopped during stage 1 runs stage 1 again from the start (same seed, same pairs).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ftlab.finetuning.groups import HEAD, optimizer_param_groups
from ftlab.models.schedules import warmup_schedule
from ftlab.runs import folder
from ftlab.utils.devices import resolve_precision
from ftlab.utils.errors import ConfigError
from ftlab.utils.safe_files import atomic_write

log = logging.getLogger("ftlab.setfit")


class ContrastiveStage:
    """Stage 1's settings (``finetune.contrastive.*`` in ``conf/finetune/setfit.yaml``).

    Args:
        num_iterations: each training example is the anchor of this many positive and this many negative pairs,
            so ``2 * num_iterations * N`` pairs (SetFit's ``num_iterations``, default 20).
        pairs: the total number of pairs instead (half positive, half negative, anchors cycling through the
            examples); ``null``: from ``num_iterations``.
        epochs: passes over the pairs. lr, weight_decay, warmup: AdamW and its linear warmup/decay (SetFit's
            body defaults: 2e-5, 0.01, 10%). batch_size: pairs per step (each step embeds 2x as many texts).
    """

    def __init__(
        self,
        num_iterations: int = 20,
        pairs: int | None = None,
        epochs: int = 1,
        batch_size: int = 16,
        lr: float = 2e-5,
        weight_decay: float = 0.01,
        warmup: float = 0.1,
    ):
        for key, value in (
            ("num_iterations", num_iterations),
            ("epochs", epochs),
            ("batch_size", batch_size),
        ):
            if int(value) < 1:
                raise ConfigError(f"finetune.contrastive.{key}={value} must be >= 1.")
        if pairs is not None and int(pairs) < 2:
            raise ConfigError(
                f"finetune.contrastive.pairs={pairs} must be >= 2 (one positive and one negative pair at least), "
                "or null to take 2 * num_iterations pairs per training example."
            )
        if not lr > 0:
            raise ConfigError(f"finetune.contrastive.lr={lr} must be > 0 (SetFit's default: 2e-5).")
        self.num_iterations, self.pairs = int(num_iterations), None if pairs is None else int(pairs)
        self.epochs, self.batch_size = int(epochs), int(batch_size)
        self.lr, self.weight_decay, self.warmup = float(lr), float(weight_decay), float(warmup)

    def settings(self) -> dict[str, Any]:
        return dict(vars(self))


def make_pairs(labels: np.ndarray, num_iterations: int, pairs: int | None, seed: int) -> np.ndarray:
    """Seeded, balanced pairs of training indices: an (P, 3) int array of rows ``(a, b, same_label)``.

    Every positive partner is another example of the anchor's class (never the anchor itself), every negative one
    an example of another class, both drawn uniformly. Anchors go through the examples in seeded random orders, so
    with ``pairs=None`` each example anchors exactly ``num_iterations`` positive and ``num_iterations`` negative
    pairs.
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2 or counts.min() < 2:
        few = {str(c): int(n) for c, n in zip(classes, counts, strict=True) if n < 2}
        raise ConfigError(
            "finetune=setfit builds pairs from the labelled training examples: it needs at least 2 classes and "
            f"at least 2 examples of every class (same-label pairs); the training split has {len(labels)} "
            f"examples in {len(classes)} classes{f', too few of {few}' if few else ''}. Give more training "
            "examples, e.g. data.examples_per_class=8."
        )
    total = pairs if pairs is not None else 2 * num_iterations * len(labels)
    rng = np.random.default_rng(seed)
    n = len(labels)
    rows = []
    for count, same in ((total - total // 2, 1), (total // 2, 0)):
        anchors = np.concatenate([rng.permutation(n) for _ in range(-(-count // n))])[:count]
        partners = np.empty(count, dtype=np.int64)
        for value in classes:
            here = labels[anchors] == value
            if same:  # uniform over the class's other members: draw among count-1, skip the anchor's slot
                members = np.flatnonzero(labels == value)
                slot = np.searchsorted(members, anchors[here])
                draw = rng.integers(0, len(members) - 1, size=int(here.sum()))
                partners[here] = members[draw + (draw >= slot)]
            else:
                others = np.flatnonzero(labels != value)
                partners[here] = others[rng.integers(0, len(others), size=int(here.sum()))]
        rows.append(np.stack([anchors, partners, np.full(count, same)], axis=1))
    table = np.concatenate(rows)
    return table[rng.permutation(len(table))]


class PairDataset(Dataset):
    """The pairs as ``(a, b, target)`` items, read from the tokenized training split."""

    def __init__(self, pairs: np.ndarray):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[int, int, float]:
        a, b, same = self.pairs[index]
        return int(a), int(b), float(same)


class PairCollator:
    """B pairs -> one padded batch of 2B texts (rows 0..B-1 the anchors, B..2B-1 the partners) and ``target``."""

    def __init__(self, examples: Any, collate: Any):
        self.examples, self.collate = (
            examples,
            collate,
        )  # the training split's items; the data module's padding

    def __call__(self, items: list[tuple[int, int, float]]) -> dict[str, torch.Tensor]:
        order = [a for a, _, _ in items] + [b for _, b, _ in items]
        batch = self.collate([self.examples[i] for i in order])
        batch.pop("labels", None)
        batch["target"] = torch.tensor([t for _, _, t in items], dtype=torch.float32)
        return batch


class ContrastiveModule(pl.LightningModule):
    """Stage 1: the backbone trained with ``MSE(cos(u, v), target)`` on pairs; ``groups``: the backbone's layer
    groups (ftlab's no-weight-decay rule for biases and norms applies here too)."""

    def __init__(self, backbone: torch.nn.Module, groups: list[Any], stage: ContrastiveStage):
        super().__init__()
        self.backbone, self.layer_groups, self.stage = backbone, groups, stage

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        target = batch.pop("target")
        embeddings = self.backbone(batch)  # (2B, H): the body's own pooling
        anchors, partners = embeddings.float().chunk(2)
        loss = F.mse_loss(F.cosine_similarity(anchors, partners, dim=-1), target)
        # sync_dist: under DDP the mean over the ranks' batches, as one process would log it
        self.log(
            "setfit/loss",
            loss,
            on_step=True,
            on_epoch=True,
            prog_bar=True,
            batch_size=len(target),
            sync_dist=True,
        )
        return loss

    def configure_optimizers(self) -> Any:
        params = optimizer_param_groups(self.layer_groups, self.stage.lr, self.stage.weight_decay, {})
        optimizer = torch.optim.AdamW(params, lr=self.stage.lr)
        total = int(self.trainer.estimated_stepping_batches)
        return {
            "optimizer": optimizer,
            "lr_scheduler": warmup_schedule(optimizer, total, "linear", self.stage.warmup),
        }


def check_run(datamodule: Any, strategy: Any = None) -> None:
    """Refuse what SetFit does not apply to (non-text data, tasks other than single-label classification) and
    FSDP (stage 1 would train a sharded copy of the body; not supported)."""
    if "fsdp" in str(strategy).lower():
        raise ConfigError(
            f"finetune=setfit does not run under FSDP (trainer.strategy={strategy}): its contrastive stage is a "
            "separate fit of the body. Use a single device or trainer=ddp."
        )
    if getattr(datamodule, "modality", None) != "text" or datamodule.task != "classification":
        raise ConfigError(
            "finetune=setfit trains a sentence encoder on pairs of labelled texts: it needs single-label text "
            f"classification, and this run has data.task={datamodule.task} on "
            f"{getattr(datamodule, 'modality', '?')} data. Use a text encoder (model=minilm, tiny_bert, bert) "
            "with a text classification data set, or another finetune=... for this one."
        )


def _key(stage: ContrastiveStage, seed: int, examples: Any) -> str:
    """What stage 1's result depends on besides the pretrained weights: its settings, the seed, the examples."""
    digest = hashlib.sha256(repr((sorted(stage.settings().items()), seed)).encode())
    examples.digest(digest)
    return digest.hexdigest()[:32]


def _reuse_body(path: Path, key: str, backbone: torch.nn.Module) -> dict[str, Any]:
    saved = folder.read_checkpoint(path)
    if saved.get("key") != key:
        raise ConfigError(
            f"resume: {path} holds a SetFit body trained with other finetune.contrastive settings, seed or "
            "training examples than this run's config. Resume with the run's own config (no overrides), or start "
            "a new run in a new folder."
        )
    backbone.load_state_dict(saved["state_dict"])
    log.info("SetFit stage 1 done before the interruption: the tuned body is read from %s.", path)
    return dict(saved["record"])


def _pair_loader(pairs: np.ndarray, examples: Any, datamodule: Any, stage: ContrastiveStage) -> DataLoader:
    return DataLoader(
        PairDataset(pairs),
        batch_size=stage.batch_size,
        shuffle=True,  # from the torch stream seeded in _fit_body (a Generator here breaks ddp_spawn's pickling)
        collate_fn=PairCollator(examples, datamodule.collator(cuda=False)),  # padded to the longest
    )


def _fit_body(cfg: Any, module: Any, loader: DataLoader, loggers: list[Any], make: Any) -> Any:
    """Stage 1's Lightning fit: ``cfg.trainer`` (devices, precision, clipping) without validation or checkpoints."""
    stage: ContrastiveStage = module.policy.contrastive
    contrastive = ContrastiveModule(module.backbone, [g for g in module.groups if g.name != HEAD], stage)
    # the whole body trains in stage 1, dropout on (the policy left it frozen, in eval mode, which Lightning keeps)
    module.backbone.requires_grad_(True)
    contrastive.train()
    progress = (cfg.get("callbacks") or {}).get("progress_bar")
    trainer = make(
        cfg.trainer,
        callbacks=[make(progress)] if progress else [],
        logger=loggers or False,
        max_epochs=stage.epochs,
        max_steps=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        precision=resolve_precision(cfg.trainer.get("precision"), cfg.trainer.get("accelerator")),
    )
    # stage 1's own random stream (dropout, shuffling), so stage 2 starts from the state it would have without it
    with torch.random.fork_rng():
        torch.manual_seed(int(cfg.seed))
        trainer.fit(contrastive, train_dataloaders=loader)
    module.apply_policy(epoch=0)  # back to the policy's frozen body for stage 2
    module.train(module.training)  # and its modes: frozen groups in eval mode again
    return trainer


def contrastive_stage(
    cfg: Any, module: Any, datamodule: Any, loggers: list[Any], make: Any, resumed: bool
) -> dict[str, Any]:
    """Run stage 1 on ``module.backbone`` (in place) or read its saved result; returns ``setfit/*`` record values.

    ``make`` instantiates configs (``ftlab.train._instantiate``); ``resumed``: ``resume=`` was given.
    """
    check_run(datamodule, cfg.trainer.get("strategy"))
    stage: ContrastiveStage = module.policy.contrastive
    train = datamodule.datasets["train"]
    examples = getattr(train, "base", train)  # the clean examples under data.text_augment
    key = _key(stage, int(cfg.seed), examples)
    path = Path(cfg.paths.output_dir) / folder.SETFIT_BODY_FILE
    if path.exists():
        if resumed:
            return _reuse_body(path, key, module.backbone)
        raise ConfigError(
            f"The run folder {path.parent} already holds a SetFit body ({path.name}) from an earlier run; continue "
            f"that run with resume={path.parent}, or choose another hydra.run.dir."
        )
    pairs = make_pairs(np.asarray(examples.labels), stage.num_iterations, stage.pairs, int(cfg.seed))
    trainer = _fit_body(cfg, module, _pair_loader(pairs, examples, datamodule, stage), loggers, make)
    loss = trainer.callback_metrics.get("setfit/loss_epoch")
    record = {
        "setfit/pairs": len(pairs),
        "setfit/loss_epoch": round(float(loss), 6) if loss is not None else None,
    }
    if trainer.is_global_zero:
        state = {k: v.detach().cpu() for k, v in module.backbone.state_dict().items()}
        saved = {"state_dict": state, "key": key, "record": record}
        atomic_write(path, lambda tmp: torch.save(saved, tmp), point="setfit_body")
    log.info("SetFit stage 1: %d pairs, last epoch's loss %s.", len(pairs), loss)
    return record
