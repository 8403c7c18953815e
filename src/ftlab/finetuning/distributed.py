"""Fine-tuning schedules under data parallelism.

``DistributedDataParallel`` registers its gradient all-reduce hooks only for the parameters that have
``requires_grad=True`` when the model is wrapped. A group frozen at that moment and unfrozen later (gradual
unfreezing) would then be updated from each rank's local gradient only, and the ranks' weights would drift apart
without any error. ftlab therefore keeps ``requires_grad=True`` under DDP for every group that the schedule will
unfreeze at some epoch; while such a group is frozen, its gradients are computed and all-reduced as usual and
dropped before the optimizer step (and before gradient clipping), so its weights stay bit-identical and its norm
layers stay in eval mode. Groups frozen for the whole run (``k``, ``head_only``) and fixed parameters (PEFT base
weights, BitFit) keep ``requires_grad=False`` and are simply not part of DDP. The cost: while a group waits to be
unfrozen, the backward pass runs through it.

FSDP (``trainer=fsdp``, ftlab.finetuning.sharding) is treated the same way: with ``use_orig_params=True`` it
reduce-scatters the gradients of every parameter that had ``requires_grad`` when it wrapped the model, so a group
that waits to be unfrozen keeps it and its gradients are dropped before the step. Other multi-process strategies
(DeepSpeed) flatten parameters; freezing schedules are not supported with them and fail with a ``ConfigError``
rather than train wrongly. A static freeze is left to the strategy.
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy

from ftlab.finetuning.policy import FinetunePolicy
from ftlab.utils.errors import ConfigError


def distributed_keep_grad(trainer: pl.Trainer, policy: FinetunePolicy, group_names: list[str]) -> set[str]:
    """The groups that must keep ``requires_grad=True`` while frozen, for ``trainer``'s strategy (empty when not
    distributed or nothing unfreezes during the run)."""
    scheduled = policy.frozen(group_names, epoch=0) - policy.always_frozen(group_names)
    if trainer.world_size <= 1 or not scheduled:
        return set()
    strategy = trainer.strategy
    if not isinstance(strategy, (DDPStrategy, FSDPStrategy)):
        raise ConfigError(
            f"finetune.every_n_epochs={policy.every_n_epochs} (gradual unfreezing) with trainer.strategy="
            f"{type(strategy).__name__} on {trainer.world_size} processes is not supported: groups unfrozen during "
            "training would not be synchronised across processes. Use a DDP or FSDP strategy (trainer=ddp, ddp_cpu, "
            "fsdp, fsdp_cpu, strategy ddp_spawn / ddp_fork), a single device, or a static freeze (finetune=freeze_bottom)."
        )
    return scheduled
