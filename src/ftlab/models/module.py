"""The training system: backbone + head + fine-tuning policy + task; optimizers. Task-generic: the loss, the
metrics and the shape of the outputs come from the task (:mod:`ftlab.tasks`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import pytorch_lightning as pl
import torch
import torchmetrics
from torch import nn

from ftlab.callbacks import STEP_LOSS
from ftlab.finetuning.distributed import distributed_keep_grad
from ftlab.finetuning.groups import (
    build_groups,
    count_parameters,
    optimizer_param_groups,
    set_frozen_modes,
    set_trainable,
)
from ftlab.finetuning.policy import FinetunePolicy
from ftlab.models.adversarial import Adversary
from ftlab.models.backbones.contract import SplittableBackbone, TokenBackbone
from ftlab.models.clipping import clip_in_fused_step, fused_clipping_applies
from ftlab.tasks import ClassificationTask, GenerativeTask, RegressionTask, Task
from ftlab.utils.errors import ConfigError

STAGES = ("train", "val", "test")


class FinetuneModule(pl.LightningModule):
    """A task's model (backbone + head) trained under a fine-tuning policy.

    Args:
        backbone, head: plain ``nn.Module`` s; the backbone follows :class:`~ftlab.models.backbones.contract.Backbone`.
        policy: which groups train and at which LR (:class:`~ftlab.finetuning.FinetunePolicy`).
        task: the loss, the metrics and how outputs become predictions (:class:`~ftlab.tasks.Task`).
        optimizer: a partial optimizer (``lr`` and ``weight_decay`` as its keywords) completed with parameter groups.
        scheduler: a partial of :mod:`ftlab.models.schedules` completed with the optimizer and step count, or None.
        task_options: the ``module.*`` options the task was built with (saved, so a run is rebuilt the same way).
        adversarial: adversarial training (:mod:`ftlab.models.adversarial`, ``adversarial=fgm``); None: plain steps.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        policy: FinetunePolicy,
        task: Task,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., dict[str, Any]] | None = None,
        task_options: dict[str, Any] | None = None,
        adversarial: Adversary | None = None,
    ):
        super().__init__()
        if task.level == "token" and not isinstance(backbone, TokenBackbone):
            raise ConfigError(
                f"data.task={task.name} needs one output per token, and the backbone {type(backbone).__name__} "
                "gives one vector per example. Use a text backbone (model=minilm, bert, tiny_bert)."
            )
        # what rebuilding the run needs: the task, its labels and options (checkpoint hyper-parameters)
        self.save_hyperparameters(
            {
                "task": task.name,
                "num_classes": task.num_labels,
                "label_names": task.label_names,
                "task_options": dict(task_options or {}),
                # an image run's input size, which data.input_size=auto may have chosen from its data
                "input_size": getattr(getattr(backbone, "preprocessing", None), "input_size", None),
                **task.hparams(),
            }
        )
        self.backbone, self.head, self.policy, self.task = backbone, head, policy, task
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.adversarial = adversarial
        self.distiller: Any = None  # knowledge distillation's training loss (ftlab.distill.attach_teacher)
        self.lr_search = False  # tune.lr's search is running (ftlab.lr_finder)
        self.fixed = policy.prepare(backbone)  # re-init, PEFT wrapping: before the groups are built
        self.groups = build_groups(backbone, head)
        self.group_names = [g.name for g in self.groups]
        policy.check(self.group_names)
        self.frozen: set[str] = set()
        self.keep_grad: set[str] = set()
        self.apply_policy(epoch=0)
        # ModuleDict keys cannot be "train" (an nn.Module method), hence the suffix
        self.metrics: Any = nn.ModuleDict({f"{stage}_metrics": task.metrics() for stage in STAGES})
        # the epoch's mean loss per stage, weighted by batch size and reduced across ranks (no per-step self.log)
        self.losses: Any = nn.ModuleDict(
            {f"{stage}_loss": torchmetrics.MeanMetric(nan_strategy="disable") for stage in STAGES}
        )
        self.pending = PendingUpdates()

    # --- fine-tuning policy -------------------------------------------------------------------------------------
    def apply_policy(self, epoch: int) -> None:
        """Freeze/unfreeze groups for ``epoch``; a function of the epoch only, so resume lands in the same state."""
        self.policy_epoch = epoch
        self.frozen = self.policy.frozen(self.group_names, epoch)
        set_trainable(self.groups, self.frozen, self.fixed, self.keep_grad)
        if self.training:
            self.train(True)

    def train(self, mode: bool = True) -> FinetuneModule:
        super().train(mode)
        if mode:  # Module.train() turned every submodule to train mode: frozen groups go back to eval
            set_frozen_modes(self.groups, self.frozen, self.policy.train_bn, self.policy.frozen_dropout)
        return self

    def parameter_counts(self) -> dict[str, float]:
        return count_parameters(self.groups)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.keep_grad = distributed_keep_grad(self.trainer, self.policy, self.group_names)
            self.apply_policy(epoch=0)

    def on_train_epoch_start(self) -> None:
        self.apply_policy(self.current_epoch)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Lightning skips on_train_epoch_start for the first epoch of a run resumed from a checkpoint written at the
        # end of the previous epoch: the first batch of an epoch checks that the policy is at that epoch.
        if self.policy_epoch != self.current_epoch:
            self.apply_policy(self.current_epoch)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # before gradient clipping: frozen groups that kept requires_grad for DDP neither move nor count in the norm
        for group in self.groups:
            if group.name in self.frozen and group.name in self.keep_grad:
                for _, param in group.params:
                    param.grad = None
        if (
            self.lr_search
        ):  # Lightning's LR search gives every group one lr: the policy's multipliers still hold
            for param_group in optimizer.param_groups:
                param_group["lr"] *= param_group.get("lr_scale", 1.0)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: int | float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # norm clipping folded into a fused optimizer's step (one pass over the gradients fewer; models/clipping.py)
        if gradient_clip_val and fused_clipping_applies(optimizer, self._trainer, gradient_clip_algorithm):
            clip_in_fused_step(optimizer, float(gradient_clip_val))
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # --- steps --------------------------------------------------------------------------------------------------
    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The head's input: pooled (B, H), or per token (B, T, H) for token-level tasks."""
        # cached features of a frozen backbone (ftlab.finetuning.feature_cache) go straight to the head
        if "features" in batch:
            return batch["features"]
        if "hidden_states" in batch:  # the cached output of the frozen bottom groups: run the rest
            backbone = self.backbone
            if not isinstance(backbone, SplittableBackbone):
                raise TypeError(f"{type(backbone).__name__} cannot run from cached hidden states")
            pool = self.task.level == "sequence"
            return backbone.forward_from(
                int(batch["start_group"]), batch["hidden_states"], batch["attention_mask"], pool
            )
        if self.task.level == "token":  # a TokenBackbone: checked when the module was built
            tokens: Any = self.backbone
            return tokens.token_features(batch)
        return self.backbone(batch)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The task's logits: (B, C); (B,) for regression; (B, T, C) for token classification."""
        return self.task.shape_logits(self.head(self.features(batch)))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The task's loss (the training step's, and handy in a hand-written loop)."""
        return self.task.loss(logits, labels)

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        logits = self(batch)
        if stage == "train" and self.distiller is not None:  # alpha*CE + (1-alpha)*T^2*KL (ftlab.distill)
            loss = self.distiller.loss(self, logits, batch)
        else:
            loss = self.loss(logits, batch["labels"])
        # Metric and loss states are computed (and synced across ranks) once per epoch: no self.log per step, which
        # costs ~1 ms of Python (Lightning's result collection) for a value written only every log_every_n_steps.
        # The step's detached outputs wait on the device and reach the metrics several steps at a time
        # (PendingUpdates): no metric kernels and no host sync inside a step.
        value = loss.detach()
        self.pending.add(stage, logits.detach(), batch["labels"], batch.get("labelled"), value)
        if self.pending.full(stage):
            self.flush_metrics(stage)
        if stage == "train" and self._writes_step_logs():
            # every rank logs at the same steps; sync_dist: the mean over the ranks' equal-sized batches, i.e. the
            # loss of the global batch, as one process would log it (one all-reduce per logged step)
            # not prog_bar: Lightning would read a progress-bar value back to the host after every step, also at
            # steps that log nothing (the progress bars show it from callback_metrics: ftlab.callbacks)
            self.log(STEP_LOSS, value, on_step=True, on_epoch=False, sync_dist=True)
        return loss

    def flush_metrics(self, stage: str) -> None:
        """Give the metrics and the mean loss of ``stage`` the steps still waiting (before they are read)."""
        for logits, labels, losses in self.pending.take(stage):
            if len(labels):  # a distillation batch of transfer rows alone has none
                self.task.update_metrics(self.metrics[f"{stage}_metrics"], logits, labels)
            # the batch mean repeated per example = weighted by batch size; MeanMetric's own `weight` argument is
            # ignored under nan_strategy="disable" (torchmetrics 1.9), the setting that spares a host sync
            self.losses[f"{stage}_loss"].update(losses)

    def _writes_step_logs(self) -> bool:
        """Whether Lightning writes step-level values at this training step (every ``log_every_n_steps``)."""
        if self._trainer is None:
            return False
        # private in Lightning 2.6; True where it is missing
        connector = getattr(self._trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.adversarial is not None:  # its extra passes call _step for the clean loss and metrics
            return self.adversarial.training_loss(self, batch, batch_idx)
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")
        if isinstance(self.task, GenerativeTask):  # generated text scored against the references (causal_lm)
            self.task.generation_step(self, batch, self.metrics["val_metrics"])

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")
        if isinstance(self.task, GenerativeTask):
            self.task.generation_step(self, batch, self.metrics["test_metrics"])

    def _log_epoch_metrics(self, stage: str) -> None:
        self.flush_metrics(stage)
        values = self.metrics[f"{stage}_metrics"].compute()
        # torchmetrics already reduced the values over all ranks; sync_dist says so to Lightning (its mean over
        # equal values is exact) and spares the epoch-level-logging-without-sync_dist warning under DDP
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, prog_bar=stage == "val", sync_dist=True)
        self.metrics[f"{stage}_metrics"].reset()
        # the names Lightning gave the loss when it was logged per step: train/loss_epoch beside train/loss_step
        loss = self.losses[f"{stage}_loss"]
        if loss.update_count:
            name = "train/loss_epoch" if stage == "train" else f"{stage}/loss"
            self.log(name, loss.compute(), prog_bar=stage == "train", sync_dist=True)
        loss.reset()

    def on_train_epoch_end(self) -> None:
        self._log_epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self.flush_metrics("val")
        self.task.on_validation_epoch_end(self.metrics["val_metrics"])  # before ModelCheckpoint saves
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    # --- optimization -------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        keywords = getattr(self.optimizer_factory, "keywords", {})
        if keywords.get("lr") is None:
            raise ConfigError(
                f"optimizer.lr is {'null' if 'lr' in keywords else 'not set'}: the optimizer config must give a "
                "learning rate, e.g. optimizer.lr=2e-5."
            )
        params = optimizer_param_groups(
            self.groups,
            keywords["lr"],
            keywords.get("weight_decay", 0.0),
            self.policy.lr_scales(self.group_names),
        )
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(
            optimizer, total_steps=int(self.trainer.estimated_stepping_batches)
        )
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class ClassificationModule(FinetuneModule):
    """:class:`FinetuneModule` with its task built from plain arguments: classification with ``num_classes``
    outputs, or regression when ``num_classes == 1`` (the Python API from before tasks were chosen by config).

    Args:
        num_classes: the head's outputs; 1 means regression.
        label_smoothing: for cross-entropy.
        label_names: saved in the checkpoint so evaluation and prediction name classes as training did.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        policy: FinetunePolicy,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., dict[str, Any]] | None = None,
        num_classes: int = 2,
        label_smoothing: float = 0.0,
        label_names: list[str] | None = None,
    ):
        task: Task = (
            RegressionTask()
            if num_classes == 1
            else ClassificationTask(num_classes, label_names, label_smoothing=label_smoothing)
        )
        super().__init__(
            backbone, head, policy, task, optimizer, scheduler, {"label_smoothing": label_smoothing}
        )


class _Waiting(NamedTuple):
    """One step's outputs waiting for the metrics."""

    logits: torch.Tensor  # detached
    labels: torch.Tensor
    labelled: torch.Tensor | None  # distillation: which rows have a label (None: all)
    losses: torch.Tensor  # the batch's mean loss, once per example (a batch-size-weighted mean)

    def joins(self, other: _Waiting) -> bool:
        """Whether the two concatenate along the batch: same shapes past it, same dtypes."""
        return all(
            a.shape[1:] == b.shape[1:] and a.dtype == b.dtype
            for a, b in ((self.logits, other.logits), (self.labels, other.labels))
        )


class PendingUpdates:
    """Each stage's recent steps (detached logits, labels, the distillation mask, the loss) kept on the device until
    the metrics take them, several steps at once.

    Updating torchmetrics every step costs ~0.15 ms of Python on the host and, on a GPU, a dozen small kernels and a
    host sync (the stat scores' ``torch.bincount`` sizes its output from the data); a plain loop does none of it.
    Here a step appends four references; ``take`` concatenates the waiting steps (where their shapes allow) into
    one update, every :attr:`MAX_STEPS` steps, once they hold :attr:`MAX_BYTES`, and before the metrics are read
    (epoch ends). Sequence-level outputs concatenate; token-level ones of different widths are updated a batch at a
    time, still outside the steps that produced them.
    """

    MAX_STEPS = 32
    MAX_BYTES = 16 * 2**20  # a causal LM's logits (batch x length x vocabulary) go straight through

    def __init__(self) -> None:
        self.steps: dict[str, list[_Waiting]] = {}
        self.bytes: dict[str, int] = {}

    def add(
        self,
        stage: str,
        logits: torch.Tensor,
        labels: torch.Tensor,
        labelled: torch.Tensor | None,
        loss: torch.Tensor,
    ) -> None:
        self.steps.setdefault(stage, []).append(_Waiting(logits, labels, labelled, loss.expand(len(labels))))
        size = logits.numel() * logits.element_size() + labels.numel() * labels.element_size()
        self.bytes[stage] = self.bytes.get(stage, 0) + size

    def full(self, stage: str) -> bool:
        return len(self.steps.get(stage, ())) >= self.MAX_STEPS or self.bytes.get(stage, 0) >= self.MAX_BYTES

    def take(self, stage: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The waiting steps of ``stage`` as (logits, labels, per-example losses) updates, as few as possible."""
        waiting, self.steps[stage], self.bytes[stage] = self.steps.get(stage, []), [], 0
        groups: list[list[_Waiting]] = []
        for step in waiting:  # runs of consecutive steps that concatenate
            if groups and groups[-1][-1].joins(step):
                groups[-1].append(step)
            else:
                groups.append([step])
        updates = []
        for group in groups:
            logits = torch.cat([s.logits for s in group])
            labels = torch.cat([s.labels for s in group])
            losses = torch.cat([s.losses for s in group])
            if any(
                s.labelled is not None for s in group
            ):  # rows without a label (a distillation transfer set)
                keep = torch.cat([_all_rows(s) if s.labelled is None else s.labelled for s in group])
                logits, labels = logits[keep], labels[keep]
            updates.append((logits, labels, losses))
        return updates


def _all_rows(step: _Waiting) -> torch.Tensor:
    return torch.ones(len(step.labels), dtype=torch.bool, device=step.labels.device)
