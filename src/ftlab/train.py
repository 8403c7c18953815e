"""``ftlab-train``: fine-tune a pretrained backbone on one dataset, test the best checkpoint, write the run record.

Read top to bottom: seed, backbone, data, head, policy, module, trainer, fit, test, record.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, cast

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ftlab import search
from ftlab.callbacks import BestScore, EpochSeed
from ftlab.checks.check import required_problems
from ftlab.distill import attach_teacher
from ftlab.finetuning.feature_cache import maybe_cache_features
from ftlab.finetuning.sharding import full_state_dict
from ftlab.lr_finder import tuned_lr
from ftlab.models.backbones.contract import Backbone
from ftlab.runs import folder, jobs  # noqa: F401 - jobs registers the ${ftlab.*} resolvers configs use
from ftlab.runs.rebuild import build_module
from ftlab.utils.allocator import tune_malloc
from ftlab.utils.budget import deferred, resolve_max_epochs, short_run_hint
from ftlab.utils.devices import compile_backbone, resolve_precision
from ftlab.utils.errors import ConfigError
from ftlab.utils.safe_files import atomic_write

log = logging.getLogger("ftlab.train")


def _overrides(output_dir: Path, resumed: bool) -> list[str]:
    """The overrides that define the run; for a resumed run, those of its first start (its .hydra record)."""
    saved = output_dir / folder.OVERRIDES_FILE
    if resumed and saved.is_file():
        return list(OmegaConf.load(saved))
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _instantiate(node: DictConfig, **kwargs: Any) -> Any:
    """``instantiate``; a user error raised by the constructor surfaces as itself, not wrapped by Hydra."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        user = folder.user_error(err)
        if user is None:
            raise
        raise user from None


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment described by ``cfg``; returns the metrics also written to ``metrics.json``."""
    start = time.perf_counter()
    missing = required_problems(cfg)  # the CLI checked it already; train(cfg) from Python too
    if missing:
        raise ConfigError(" ".join(missing))
    if cfg.get("zero_shot"):  # zero_shot=embedding: nothing trains; validate, test, record (ftlab.zero_shot)
        from ftlab.zero_shot import run

        if cfg.get("prompt"):
            raise ConfigError("zero_shot and prompt=verbalizer exclude each other: set one of them to null.")

        zero_shot_metrics: dict[str, Any] = run(cfg)
        _drop_checkpoints(cfg, Path(cfg.paths.output_dir))
        return zero_shot_metrics
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = folder.resume_checkpoint(output_dir) if cfg.get("resume") else None
    if ckpt_path is None:
        folder.check_fresh(output_dir)

    tune_malloc(cfg.get("malloc_tuning", True))  # glibc keeps freed memory between steps (utils/allocator.py)
    pl.seed_everything(cfg.seed, workers=True)  # before anything is built: the new head's init depends on it
    backbone: Any = _instantiate(cfg.model.backbone)
    if not isinstance(backbone, Backbone):
        raise ConfigError(
            f"model.backbone._target_={cfg.model.backbone.get('_target_')} built a {type(backbone).__name__}, which "
            "lacks the backbone contract (out_features, preprocessing, loaded_checkpoint, layer_groups(); see "
            "ftlab.models.backbones.contract.Backbone)."
        )
    prompt = _instantiate(cfg.prompt) if cfg.get("prompt") else None  # prompt=verbalizer (ftlab.verbalizer)
    if prompt is not None:  # the LM read at the template's answer slot; the data module tokenizes the prompts
        backbone = prompt.wrap(backbone, cfg.data)
    datamodule = _instantiate(cfg.data, preprocessing=backbone.preprocessing)
    datamodule.setup("fit")  # the number of classes is known only once the data is read
    if datamodule.modality == "image":  # data.input_size may have chosen the size from the images
        backbone.preprocessing = datamodule.preprocessing
    module = build_module(
        cfg,
        cast(Any, backbone),
        datamodule.num_classes,
        datamodule.label_names,
        make=_instantiate,
        task=datamodule.task,
        class_counts=datamodule.class_counts(),
    )
    if prompt is not None:  # the head's rows start as the LM's output rows of the label words
        prompt.init_head(module, datamodule.label_names)
    datamodule.label_map.save(output_dir / folder.LABELS_FILE)
    counts = module.parameter_counts()
    log.info(
        "Trainable parameters: %d of %d (%.2f%%)",
        counts["trainable_params"],
        counts["total_params"],
        100 * counts["trainable_fraction"],
    )

    compile_backbone(module.backbone, cfg.get("compile"))
    best = BestScore(cfg.monitor, cfg.monitor_mode)
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values() if c] + [EpochSeed(cfg.seed), best]
    # a job of an Optuna search: report each validation to its trial
    pruning = search.pruning_callback(cfg.monitor)
    callbacks += [pruning] if pruning is not None else []
    loggers = [instantiate(c) for c in (cfg.logger or {}).values() if c]
    # bf16 where the GPU has it, else fp16 mixed (utils/devices.py)
    precision = resolve_precision(cfg.trainer.get("precision"), cfg.trainer.get("accelerator"))
    # _instantiate: a strategy's ConfigError (e.g. FSDP inside a multirun) reaches the user as itself
    trainer: pl.Trainer = _instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, precision=precision, **deferred(cfg)
    )
    auto_epochs = resolve_max_epochs(cfg, trainer, datamodule)  # trainer.max_epochs=auto (utils/budget.py)
    if (cfg.get("distill") or {}).get("teacher"):  # the teacher's logits computed once (ftlab.distill)
        datamodule = attach_teacher(
            cfg.distill, module, datamodule, cfg.paths.cache_dir, trainer.strategy.root_device
        )
    setfit: dict[str, Any] = {}
    if (
        getattr(module.policy, "contrastive", None) is not None
    ):  # finetune=setfit: the body first learns from label pairs
        from ftlab.setfit import contrastive_stage

        setfit = contrastive_stage(
            cfg, module, datamodule, loggers, _instantiate, resumed=bool(cfg.get("resume"))
        )
    if cfg.get("feature_cache"):  # a frozen backbone's features computed once (falls back with a log line)
        datamodule = maybe_cache_features(
            module,
            datamodule,
            cfg.trainer.get("max_epochs", -1),
            cfg.paths.cache_dir,
            prefix=cfg.feature_cache == "prefix",
            device=trainer.strategy.root_device,  # computed where training runs
        )
    # tune.lr: Lightning's LR search on this module (a resumed run reads its own earlier result)
    tuned_lr(cfg, trainer, module, datamodule, output_dir, resumed=ckpt_path is not None)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)  # tensors only
    if pruning is not None:
        pruning.check(trainer)  # a trial pruned in spawned ranks (ddp_spawn) stops here
    best_record = best.record(trainer)  # also from spawned ranks (ddp_spawn)
    # a fixed length still improving at its end (not an auto one: its length was chosen for it, maybe capped)
    hint = None if auto_epochs is not None else short_run_hint(cfg, trainer, best_record.get("best_epoch"))
    if hint and trainer.is_global_zero:  # a note, not a warning: most 2-epoch runs end still improving
        log.info(hint)

    checkpoint: Any = trainer.checkpoint_callback  # the first ModelCheckpoint (callbacks/default: best)
    has_best = checkpoint is not None and bool(checkpoint.best_model_path)
    tested = trainer.test(
        module,
        datamodule=datamodule,
        ckpt_path="best" if has_best else None,
        verbose=False,
        weights_only=True,
    )
    metrics: dict[str, Any] = dict(tested[0]) if tested else {}
    if trainer.is_global_zero:
        module.task.write_files(output_dir)  # e.g. the best checkpoint's multi-label thresholds
    # test() loaded the best checkpoint's weights: save the backbone alone (for transfer) from them
    if cfg.save_backbone:  # under FSDP every rank takes part in gathering the shards
        whole = full_state_dict(trainer.strategy, module)
        state = {k.removeprefix("backbone."): v for k, v in whole.items() if k.startswith("backbone.")}
        if trainer.is_global_zero:
            atomic_write(
                output_dir / folder.BACKBONE_FILE, lambda tmp: torch.save(state, tmp), point="backbone"
            )
    if backbone.loaded_checkpoint:
        metrics["backbone_checkpoint"] = backbone.loaded_checkpoint
    metrics.update(best_record, monitor=cfg.monitor)
    metrics["task"] = module.task.name
    metrics.update(_optimizer_settings(module))
    if auto_epochs is not None:
        metrics["trainer/max_epochs"] = auto_epochs
    metrics.update(counts)
    metrics.update(setfit)
    metrics.update(
        wall_time_s=round(time.perf_counter() - start, 2),
        seed=cfg.seed,
        overrides=_overrides(output_dir, bool(cfg.get("resume"))),  # a resumed run: its first command
    )
    folder.write_metrics(output_dir / folder.METRICS_FILE, metrics)
    _summary(metrics, output_dir)
    if trainer.is_global_zero:
        _drop_checkpoints(cfg, output_dir)
    return metrics


def _drop_checkpoints(cfg: DictConfig, output_dir: Path) -> None:
    """``keep_checkpoints=false``: once ``metrics.json`` is written, delete ``checkpoints/`` and the SetFit body
    (large grids that need only the metrics: 25 SmolLM2 runs keep ~1 GB each otherwise)."""
    if cfg.get("keep_checkpoints", True):
        return
    shutil.rmtree(output_dir / folder.CHECKPOINT_DIR, ignore_errors=True)
    (output_dir / folder.SETFIT_BODY_FILE).unlink(missing_ok=True)
    log.info("keep_checkpoints=false: deleted %s/ (metrics.json is the run's record)", folder.CHECKPOINT_DIR)


def _optimizer_settings(module: Any) -> dict[str, Any]:
    """The base learning rate, weight decay and warmup the run trained with (family presets, tune.lr or set)."""
    keywords = getattr(module.optimizer_factory, "keywords", {})
    settings = {f"optimizer/{k}": keywords[k] for k in ("lr", "weight_decay") if k in keywords}
    warmup = getattr(module.scheduler_factory, "keywords", {}).get("warmup")
    if warmup is not None:
        settings["scheduler/warmup"] = warmup
    return settings


def _summary(metrics: dict[str, Any], output_dir: Path) -> None:
    shown = {k: v for k, v in metrics.items() if k.startswith("test/") or k.startswith("best/")}
    lines = [f"  {k:<16} {v:.4f}" if isinstance(v, float) else f"  {k:<16} {v}" for k, v in shown.items()]
    print("\nftlab run finished\n" + "\n".join(lines) + f"\n  run folder       {output_dir}\n", flush=True)


def main() -> None:
    """``python -m ftlab.train``, the same as ``ftlab-train``: ftlab.cli checks the config first."""
    from ftlab import cli

    cli.train()


if __name__ == "__main__":
    main()
