"""The three ways of running the same training steps: ftlab's ``train()``, a plain PyTorch loop, HF ``Trainer``.

All three build the same backbone, head and data from the same composed ftlab config (so the model, the data, the
batch size, the sequence length, the seed and the batch order are the same), run ``warmup + steps + tail`` optimizer steps
and time the ``steps`` complete iterations after the warm-up (data fetch, forward, backward, clipping, optimizer and
scheduler step, and whatever the framework does per step), taking turns step by step with the case's other runners
(``Ring``).
Start-up (imports, model loading, tokenisation), validation, testing and checkpoint writing are outside the window.
"""

from __future__ import annotations

import functools
import math
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from torch import nn
from torch.nn import functional as F


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Ring:
    """Turn-taking between the runners of a case, one training step at a time, and the timer of the steps.

    Every runner of a case runs in its own worker process at the same time; each holds the turn for exactly one
    optimizer step (data fetch, forward, backward, clipping, optimizer and scheduler, and whatever its framework
    does between steps), then hands it to the next worker (a ring of semaphores, created by the parent before the
    workers fork). So the runners' steps alternate A/B/C/A/B/C..., every runner sees the same machine conditions
    within a second of the others, and only one computes at a time. A run has ``warmup`` untimed steps (the
    first turn also overlaps the other workers' start-up), ``steps`` timed steps and ``tail`` untimed steps (after
    its last step a runner leaves the ring and tears down while the others finish their tail).
    """

    def __init__(self, turns: list[Any], index: int, timeout: float = 900.0):
        self.turns, self.index, self.timeout = turns, index, timeout
        self.reset(0, 0, 0)

    def reset(self, warmup: int, steps: int, tail: int) -> None:
        self.warmup, self.steps, self.total = warmup, steps, warmup + steps + tail
        self.done, self.t0, self.spans = 0, 0.0, []

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    @property
    def seconds(self) -> float:
        return sum(end - start for start, end in self.spans)

    def start(self) -> None:
        """Wait for this worker's turn; the step that follows is timed from here."""
        if not self.turns[self.index].acquire(timeout=self.timeout):
            raise RuntimeError(
                f"benchmark ring: no turn for {self.timeout:.0f} s; another runner failed or did a different "
                "number of steps (see its worker log)."
            )
        self.t0 = time.perf_counter()

    def mark(self, phase: str) -> None:
        """The end of a phase of the step: the ring times whole steps only (``step_profile.Probe`` times phases)."""

    def step_end(self) -> None:
        """One step done: record it if timed, hand the turn on, and wait for the next turn unless finished."""
        _sync()
        end = time.perf_counter()
        self.done += 1
        if self.warmup < self.done <= self.warmup + self.steps:
            self.spans.append((self.t0, end))
        self.turns[(self.index + 1) % len(self.turns)].release()
        if not self.finished:
            self.start()

    def result(self) -> dict[str, Any]:
        if len(self.spans) != self.steps:
            raise RuntimeError(
                f"run ended after {self.done} of {self.total} steps: not enough training batches."
            )
        return {"seconds": self.seconds, "spans": self.spans}


# Set in each benchmark worker (benchmarks/run.py); a single-runner ring when a runner is called directly.
RING: Ring | None = None


def ring() -> Ring:
    global RING
    if RING is None:
        import threading

        RING = Ring([threading.Semaphore(1)], 0)
    return RING


class RingGate(pl.Callback):
    """ftlab's step boundaries in the ring: the turn is taken at the start of training and after every batch."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ring().start()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        ring().step_end()


@functools.cache
def _cuda() -> bool:
    """Checked once per worker (not at import: the parent must not touch CUDA before it forks the workers).

    ``torch.cuda.is_available()`` loads NVML with dlopen on every call on a machine without a GPU (~0.4 ms), and
    ``_sync`` runs at the end of every step of every runner.
    """
    return torch.cuda.is_available()


def _sync() -> None:
    if _cuda():
        torch.cuda.synchronize()


def build_parts(cfg: DictConfig) -> tuple[nn.Module, nn.Module, Any]:
    """Backbone, head and a set-up data module exactly as ``ftlab.train.train`` builds them."""
    pl.seed_everything(cfg.seed, workers=True)
    backbone = instantiate(cfg.model.backbone)
    datamodule = instantiate(cfg.data, preprocessing=backbone.preprocessing)
    datamodule.setup("fit")
    head = instantiate(cfg.model.head, in_features=backbone.out_features, num_classes=datamodule.num_classes)
    return backbone, head, datamodule


class Classifier(nn.Module):
    """Backbone + head + cross-entropy; the bottom ``frozen`` layer groups frozen and kept in eval mode."""

    def __init__(self, backbone: nn.Module, head: nn.Module, frozen: int):
        super().__init__()
        self.backbone, self.head = backbone, head
        groups = backbone.layer_groups()
        self.frozen_modules = [m for _, modules in groups[:frozen] for m in modules]
        for module in self.frozen_modules:
            module.requires_grad_(False)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        for module in self.frozen_modules:  # frozen layers: no dropout, as in ftlab's policy
            module.eval()
        return self

    def forward(self, labels: torch.Tensor, num_items_in_batch: Any = None, **inputs: Any) -> dict:
        logits = self.head(self.backbone(inputs))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def frozen_groups(cfg: DictConfig, backbone: nn.Module) -> int:
    """How many bottom groups the case's ``finetune`` config freezes."""
    if cfg.finetune.get("freeze_backbone"):
        return len(backbone.layer_groups())
    return int(cfg.finetune.get("k", 0) or 0)


def _schedule(optimizer: torch.optim.Optimizer, total: int) -> Any:
    from transformers import get_scheduler

    return get_scheduler("linear", optimizer, num_warmup_steps=round(0.1 * total), num_training_steps=total)


def run_plain(cfg: DictConfig, warmup: int, steps: int, tail: int = 1) -> dict[str, Any]:
    """The reference: a hand-written loop over the same loader, AdamW, clipping, linear warmup/decay."""
    backbone, head, datamodule = build_parts(cfg)
    model = Classifier(backbone, head, frozen_groups(cfg, backbone))
    return plain_loop(cfg, model, datamodule, warmup, steps, tail)


def plain_loop(
    cfg: DictConfig,
    model: nn.Module,
    datamodule: Any,
    warmup: int,
    steps: int,
    tail: int = 1,
    gate: Any = None,
) -> dict[str, Any]:
    """The hand-written training loop of the plain runners (``run_plain``, ``llm_lora.run_plain_peft``).

    ``gate`` times the steps: by default this worker's :class:`Ring`; ``step_profile.Probe`` passes itself (the
    same interface: ``start``, ``mark``, ``step_end``, ``finished``, ``result``) to time each phase."""
    device = torch.device("cuda" if cfg.trainer.accelerator == "gpu" else "cpu")
    bf16 = str(cfg.trainer.get("precision")).startswith("bf16")  # autocast, as Lightning's bf16-mixed
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    # fused, as ftlab's adamw config and HF Trainer's default (adamw_torch_fused): the same optimizer work in all
    optimizer = torch.optim.AdamW(
        params, lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay, fused=True
    )
    scheduler = _schedule(optimizer, warmup + steps + tail)
    if gate is None:
        gate = ring()
        gate.reset(warmup, steps, tail)
    gate.start()
    while not gate.finished:
        for batch in datamodule.train_dataloader():
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            gate.mark("data")
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(**batch)["loss"]
            gate.mark("forward")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            gate.mark("backward")
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            gate.mark("optimizer")
            gate.step_end()
            if gate.finished:
                break
    return gate.result()


def run_ftlab(cfg: DictConfig, warmup: int, steps: int, tail: int = 1) -> dict[str, Any]:
    """ftlab's own ``train()`` with the case's config, stopped after ``warmup + steps + tail`` steps."""
    from ftlab.train import train

    ring().reset(warmup, steps, tail)
    with tempfile.TemporaryDirectory() as tmp, open_dict(cfg):
        cfg.paths.output_dir = tmp
        cfg.trainer.max_steps = warmup + steps + tail
        cfg.trainer.max_epochs = -1
        cfg.callbacks["bench_ring"] = {"_target_": "runners.RingGate"}
        train(cfg)
    return ring().result()


def run_hf_trainer(cfg: DictConfig, warmup: int, steps: int, tail: int = 1) -> dict[str, Any]:
    """HF ``Trainer`` on the same model and the same loader (same batches in the same order)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    backbone, head, datamodule = build_parts(cfg)
    model = Classifier(backbone, head, frozen_groups(cfg, backbone))
    gate = ring()
    gate.reset(warmup, steps, tail)

    class Gate(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            gate.start()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            gate.step_end()

    class SameBatches(Trainer):
        def get_train_dataloader(self) -> Any:
            return datamodule.train_dataloader()

    total = warmup + steps + tail
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            max_steps=total,
            per_device_train_batch_size=cfg.data.batch_size,
            learning_rate=cfg.optimizer.lr,
            weight_decay=cfg.optimizer.weight_decay,
            lr_scheduler_type="linear",
            warmup_steps=round(0.1 * total),
            max_grad_norm=1.0,
            logging_steps=cfg.trainer.log_every_n_steps,
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=cfg.trainer.accelerator != "gpu",
            bf16=str(cfg.trainer.get("precision")).startswith("bf16"),
            seed=cfg.seed,
            remove_unused_columns=False,
            dataloader_num_workers=0,  # unused: get_train_dataloader returns the shared loader
        )
        SameBatches(model=model, args=args, callbacks=[Gate()]).train()
    return gate.result()


def run_plain_peft(cfg: DictConfig, warmup: int, steps: int, tail: int = 1) -> dict[str, Any]:
    """A plain PyTorch + peft LoRA loop (benchmarks/llm_lora.py: the SmolLM2 case)."""
    from llm_lora import run_plain_peft as run

    return run(cfg, warmup, steps, tail)


RUNNERS = {"ftlab": run_ftlab, "plain": run_plain, "hf_trainer": run_hf_trainer, "plain_peft": run_plain_peft}


def step_flops(cfg: DictConfig, batches: int = 3) -> dict[str, float]:
    """Training FLOPs (forward + backward) per example, counted by torch on the first ``batches`` batches.

    An estimate: bucketed batches differ in width, so the timed window's mean may differ by a few percent.
    """
    from torch.utils.flop_counter import FlopCounterMode

    backbone, head, datamodule = build_parts(cfg)
    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flop}
    model = Classifier(backbone, head, frozen_groups(cfg, backbone)).train()
    flops = examples = 0
    for i, batch in enumerate(datamodule.train_dataloader()):
        if i == batches:
            break
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            model(**batch)["loss"].backward()
        flops, examples = flops + counter.get_total_flops(), examples + len(batch["labels"])
    return {"flops_per_example": flops / examples}


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:  # fmt: skip
    """Backward FLOPs of a convolution: one forward conv's worth for each of grad_input and grad_weight.

    torch's own formula (torch 2.14) ignores ``groups`` in the grad_weight term and so counts a depthwise conv's
    weight gradient once per channel: it reported 2.6 GFLOP per EfficientNet-Lite0 training example at 64 px, whose
    forward is 0.063 GFLOP (42x), and FLOP/s above the matmul peak.
    """
    from torch.utils.flop_counter import conv_flop_count

    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def matmul_peak(n: int = 2048, repeats: int = 10, gpu: bool = False) -> float:
    """Best FLOP/s of an ``n x n`` matmul: fp32 on the CPU with torch's default thread count; with ``gpu``, bf16
    (the precision the GPU cases train in) at ``n = 8192`` on the CUDA device."""
    if gpu:
        n = 8192
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm up
    best = math.inf
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        a @ b
        _sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def work_dir() -> Path:
    return Path(tempfile.gettempdir())


__all__ = ["RUNNERS", "Ring", "RingGate", "matmul_peak", "step_flops", "_max_rss_mb"]
