"""The benchmark cases: ftlab config overrides shared by all runners of a case, and the size of a run."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
RUNNERS = ("ftlab", "plain", "hf_trainer")


class Plan(NamedTuple):
    repetitions: int
    warmup: int  # untimed steps first (allocator, thread pools, lazy init)
    steps: int  # timed steps per repetition
    cache_dir: str | None = None  # tokenised data cache shared by all runners (a fresh tmp folder if None)


# Sized for `make bench` within 20 minutes on 2 CPU cores (measured 2026-11-26: 12 min 12 s with turns step by step,
# fresh workers and 2 warm-up steps; 19 min and 15 min 20 s before, with the padding case validating after its
# steps; one MiniLM step at batch 32 and 64 tokens takes 0.33-0.43 s): 5 repetitions x 3 runners x (4 + 12 + 1)
# steps per case; the cache cases 2 repetitions. 4 warm-up steps: in fresh workers the third step still took
# 1.5-2.5x a typical one for every runner (first-touch page faults of the heap's growth, lazy init), by different
# amounts per runner (ftlab's tuned allocator: 520-550 ms against 630-810 for the others over 8 repetitions), a one-off
# cost of a new process that a real run pays once, not per step. With whole runs alternating and 3 repetitions, the
# median ftlab/plain ratio of full fine-tuning moved between 0.94 and 1.03 from run to run; 5 make it steadier.
FULL_PLAN = Plan(repetitions=5, warmup=4, steps=12)
# On a GPU a step is ~25 ms and every batch width costs kernel selection when first seen (~150 ms for MiniLM on an
# H200): more warm-up steps, so that the timed ones meet widths already seen, and more timed steps.
GPU_PLAN = Plan(repetitions=5, warmup=24, steps=48)
QUICK_PLAN = Plan(repetitions=2, warmup=2, steps=4)


@dataclass
class Case:
    name: str
    overrides: list[str]
    batch_size: int
    runners: tuple[str, ...] = RUNNERS
    skip: str | None = None
    # runner name -> (runner in runners.RUNNERS, extra overrides); by default a name is its runner
    variants: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    baseline: str = "ftlab"  # the numerator of the reported ratios
    steps: int | None = None  # overrides the plan's timed steps
    warmup: int | None = None  # overrides the plan's untimed steps
    count_flops: bool = True  # off where runners do different work (cached vs uncached)
    repetitions: int | None = None  # overrides the plan's repetitions
    prepare: Callable[[], None] | None = None  # run once in the parent before the case (e.g. convert a model)

    def variant(self, name: str) -> tuple[str, list[str]]:
        runner, extra = self.variants.get(name, (name, []))
        return runner, [*self.overrides, *extra]


def _device(gpu: bool, text: bool) -> list[str]:
    """CPU in fp32 (the issue's setting); ``--gpu``: what ``trainer=gpu`` does (bf16 autocast, pinned batches from
    loader workers, text widths padded to a multiple of 8), explicit rather than ``auto`` so that the plain loop and
    Trainer, which have no Lightning trainer to resolve ``auto`` against, get the same loader."""
    if not gpu:
        return ["trainer.accelerator=cpu"]
    loader = ["data.num_workers=2", "data.pin_memory=true", *(["data.pad_to_multiple_of=8"] if text else [])]
    return ["trainer.accelerator=gpu", "trainer.precision=bf16-mixed", *loader]


def _common(cache_dir: str, batch_size: int, gpu: bool = False, text: bool = True) -> list[str]:
    """Run settings for every case: the device, no validation (training steps only), one test batch, log progress."""
    return [
        *_device(gpu, text),
        "trainer.devices=1",
        "++trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
        "++trainer.limit_test_batches=1",
        "~callbacks.early_stopping",  # it needs val/acc, which a steps-only run never computes
        # no checkpoints: the plain loop and Trainer (save_strategy="no") write none either, and a MiniLM checkpoint
        # with AdamW state (~360 MB, two per run) took ~20 s of disk writes per run, outside the timed steps but
        # inside the turns of the untimed ones (benchmarks/runners.py: Ring)
        "~callbacks.model_checkpoint",
        "~callbacks.last_checkpoint",
        "++trainer.enable_checkpointing=false",
        "callbacks.progress_bar.kind=log",
        "feature_cache=false",  # same work in every runner; the cache has its own case
        f"data.batch_size={batch_size}",
        f"paths.cache_dir={cache_dir}",
    ]


def _image_skip() -> str | None:
    if importlib.util.find_spec("ftlab.models.backbones.vision") is None:
        return "needs the image branch (ftlab.models.backbones.vision)"
    if not (CONF_DIR / "model" / "efficientnet_lite0.yaml").is_file():
        return "needs conf/model/efficientnet_lite0.yaml"
    return None


def build(quick: bool, cache_dir: str, gpu: bool = False) -> list[Case]:
    """MiniLM on Rotten Tomatoes (full, head_only, freeze_bottom k=4); EfficientNet-Lite0 on MNIST-5k.

    ``gpu`` (not quick): the GPU suite instead (:func:`gpu_cases`)."""
    if gpu and not quick:
        return gpu_cases(cache_dir)
    return _cpu_suite(quick, cache_dir, gpu)


# The GPU suite's ftlab variants beside the plain loop and HF Trainer: ftlab as configured, compiled (torch.compile's
# default mode) and compiled with CUDA graphs (mode reduce-overhead; one graph per batch width, widths in multiples
# of 8 on a GPU). Compilation happens in the warm-up steps, outside the timed window.
COMPILED = {
    "ftlab_compile": ("ftlab", ["compile=true"]),
    "ftlab_cudagraphs": ("ftlab", ["compile=reduce-overhead"]),
}


def gpu_cases(cache_dir: str) -> list[Case]:
    """Full fine-tuning in bf16 on one GPU: MiniLM at batch 32 and 128 (max length 64) and a BERT-base-sized model
    with random weights (12 layers, hidden 768; MiniLM's vocabulary) at batch 32 and max length 128; each ftlab vs
    the plain loop vs HF Trainer. The ``/compile`` cases (one repetition each: compiling takes most of their time)
    add ftlab compiled and ftlab with CUDA graphs beside ftlab and the plain loop."""
    reviews = ["data=rotten_tomatoes", "data.max_train_examples=null", "finetune=full"]
    minilm = ["model=minilm", *reviews, "data.max_length=64"]
    bert_base = [
        "model=minilm",
        "model.backbone.pretrained=false",
        "+model.backbone.config_overrides={hidden_size:768,num_hidden_layers:12,num_attention_heads:12,"
        "intermediate_size:3072}",
        *reviews,
        "data.max_length=128",
    ]
    sized = [
        ("minilm_rt/full", minilm, 32),
        ("minilm_rt_b128/full", minilm, 128),
        ("bert_base_rt128/full", bert_base, 32),
    ]
    built = [Case(name, [*o, *_common(cache_dir, b, True)], b) for name, o, b in sized]
    compiled = [
        Case(
            name.replace("/full", "/compile"),
            [*o, *_common(cache_dir, b, True)],
            b,
            ("ftlab", "plain", *COMPILED),
            variants=dict(COMPILED),
            repetitions=1,
            warmup=64,  # compilation, and a CUDA graph recorded for every width, before the timed steps
        )
        for name, o, b in sized
    ]
    return [*built, *compiled]


def _cpu_suite(quick: bool, cache_dir: str, gpu: bool) -> list[Case]:
    if quick:
        text = [
            "model=tiny_bert",
            "data=rotten_tomatoes",
            "data.max_train_examples=200",
            "data.max_length=32",
        ]
        text_batch = 16
    else:  # the reference setting: 3,000 reviews, batch 32, max length 64
        text = ["model=minilm", "data=rotten_tomatoes", "data.max_train_examples=3000", "data.max_length=64"]
        text_batch = 32
    text = [*text, *_common(cache_dir, text_batch, gpu)]
    # (until 2026-11-26 the padding case was built before the common settings were added: its ftlab runs validated
    # on the whole validation split and wrote checkpoints after the timed steps, ~2 min of each repetition)
    padding = _padding_case(text, quick, cache_dir, text_batch)
    image = [
        "model=efficientnet_lite0",
        "model.backbone.input_size=64",
        "data=mnist5k",
        *_common(cache_dir, 32, gpu, text=False),
    ]
    image_skip = "skipped in --quick" if quick else _image_skip()
    return [
        Case("minilm_rt/full", [*text, "finetune=full"], text_batch),
        Case("minilm_rt/head_only", [*text, "finetune=head_only"], text_batch),
        Case(
            "minilm_rt/freeze_bottom_k4",
            [*text, "finetune=freeze_bottom", f"finetune.k={2 if quick else 4}"],
            text_batch,
        ),
        _overhead_case(cache_dir, quick, gpu),
        Case("effnet_lite0_mnist/full", [*image, "finetune=full"], 32, skip=image_skip),
        Case("effnet_lite0_mnist/head_only", [*image, "finetune=head_only"], 32, skip=image_skip),
        padding,
        Case(
            "minilm_rt/head_only_feature_cache",
            [*text, "finetune=head_only"],
            text_batch,
            ("cached", "uncached"),
            variants={"cached": ("ftlab", ["feature_cache=true"]), "uncached": ("ftlab", [])},
            baseline="cached",
            count_flops=False,
            repetitions=2,  # the ratio is far from 1; the cached runs read the features from disk after the first
        ),
        Case(
            "minilm_rt/freeze_bottom_k4_feature_cache",
            [*text, "finetune=freeze_bottom", f"finetune.k={2 if quick else 4}"],
            text_batch,
            ("cached", "uncached"),
            variants={"cached": ("ftlab", ["feature_cache=prefix"]), "uncached": ("ftlab", [])},
            baseline="cached",
            count_flops=False,
            repetitions=2,  # the ratio is far from 1; the cached runs read the features from disk after the first
        ),
        _adversarial_case(text, text_batch),
        _llm_lora_case(cache_dir, quick, gpu),
    ]


def _llm_lora_case(cache_dir: str, quick: bool, gpu: bool) -> Case:
    """SmolLM2-135M + LoRA at batch 8 and 128 tokens: ftlab vs a plain PyTorch + peft loop (benchmarks/llm_lora.py).

    A CPU step is seconds (135M parameters x 1,024 tokens), so 2 repetitions of 2 + 4 steps; on a GPU the plan's.
    """
    import llm_lora

    from ftlab.models.backbones.llm import default_cache_dir

    model_cache = str(default_cache_dir())  # converted once per machine, not once per benchmark run
    overrides = llm_lora.case_overrides(_common(cache_dir, llm_lora.BATCH, gpu), model_cache)
    return Case(
        llm_lora.CASE,
        overrides,
        llm_lora.BATCH,
        ("ftlab", "plain_peft"),
        skip="skipped in --quick" if quick else None,
        steps=None if gpu else 4,
        warmup=None if gpu else 2,
        repetitions=None if gpu else 2,
        count_flops=False,  # runners.step_flops counts full fine-tuning, not LoRA's backward
        prepare=lambda: llm_lora.convert_once(model_cache),
    )


def _overhead_case(cache_dir: str, quick: bool, gpu: bool = False) -> Case:
    """Framework cost per step: a 2-layer BERT at batch 4 and 16 tokens, where compute is ~3 ms a step.

    The large cases measure ftlab against the plain loop within the run-to-run noise of a ~0.3 s step (a few %);
    here the per-step Python work of each runner (Lightning's loop, hooks, metric updates and logging in ftlab;
    Trainer's loop; nothing but the step in the plain loop) is most of the step, so the ms/step column shows it.
    """
    overrides = [
        "model=tiny_bert",
        "data=rotten_tomatoes",
        "data.max_train_examples=2000",
        "data.max_length=16",
        "finetune=full",
        *_common(cache_dir, 4, gpu),
    ]
    return Case("tiny_bert/overhead", overrides, 4, steps=20 if quick else 100, warmup=10, count_flops=False)


def _adversarial_case(text: list[str], batch: int) -> Case:
    """Cost per step of adversarial training (issue #15) relative to plain full fine-tuning: FGM (one extra forward
    and a backward to the embeddings), PGD (K = 3 steps, random start), FreeLB (K = 2) at their config defaults."""
    variants = {
        "plain": ("ftlab", []),
        "fgm": ("ftlab", ["adversarial=fgm"]),
        "pgd": ("ftlab", ["adversarial=pgd"]),
        "freelb": ("ftlab", ["adversarial=freelb"]),
    }
    return Case(
        "minilm_rt/adversarial",
        [*text, "finetune=full"],
        batch,
        tuple(variants),
        variants=variants,
        baseline="plain",
        count_flops=False,
        repetitions=2,  # the ratios are far from 1
    )


def _padding_case(text: list[str], quick: bool, cache_dir: str, batch: int) -> Case:
    """ftlab full fine-tuning at max length 128: length buckets vs per-batch dynamic padding vs fixed padding.

    The training set is exactly warmup + timed steps batches, so the timed window covers nearly one epoch and
    every variant trains on the same examples (only their grouping into batches differs).
    """
    steps = 4 if quick else 8
    examples = batch * (steps + 2)
    base = [o for o in text if not o.startswith(("data.max_length", "data.max_train_examples"))]
    base += [
        f"data.max_length={32 if quick else 128}",
        f"data.max_train_examples={examples}",
        "finetune=full",
    ]
    variants = {
        "bucketed": ("ftlab", ["data.bucketing=true"]),
        "dynamic": ("ftlab", ["data.bucketing=false"]),
        "max_length": ("ftlab", ["data.bucketing=false", "data.padding=max_length"]),
    }
    name = "minilm_rt128/padding" if not quick else "minilm_rt/padding"
    # 2 warm-up steps: all variants are ftlab (the same one-off costs), and warm-up + timed steps make one epoch
    return Case(
        name, base, batch, tuple(variants), variants=variants, baseline="bucketed", steps=steps, warmup=2
    )


def compose(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)
