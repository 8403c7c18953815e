"""SmolLM2-135M + LoRA in ``make bench``: ftlab's ``train()`` against a plain PyTorch + ``peft`` loop.

Both runners build the same backbone (the decoder body, last-token pooling), the same head and the same data module
from the case's composed config, so they see the same batches in the same order (Rotten Tomatoes, batch 8, every
batch padded to 128 tokens); the plain loop applies LoRA with ``peft`` itself (same rank, alpha, dropout and the
Llama projections that ftlab's preset targets) and trains adapters and head with fused AdamW, clipping and a linear
schedule, as ``runners.run_plain`` does for the other cases. Run alone::

    python benchmarks/run.py --cases smollm2_rt128/lora
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import runners
from omegaconf import DictConfig

CASE = "smollm2_rt128/lora"
BATCH, LENGTH = 8, 128


def case_overrides(common: list[str], model_cache: str) -> list[str]:
    """The case's config: the embedded SmolLM2 (converted into ``model_cache``, not the run's fresh cache) + LoRA."""
    return [
        "model=smollm2",
        f"model.backbone.cache_dir={model_cache}",
        "data=rotten_tomatoes",
        f"data.max_train_examples={BATCH * 40}",
        f"data.max_length={LENGTH}",
        "data.padding=max_length",  # every batch 8 x 128: the stated setting, not dynamic widths
        "finetune=lora",
        *common,
    ]


def convert_once(model_cache: str) -> None:
    """Convert the GGUF file before the workers fork, in a child process (the parent's peak RSS is inherited by
    every worker it forks, so the parent must not load the model itself)."""
    code = "import sys; from ftlab.models.backbones.llm import resolve_llm; resolve_llm('embedded:smollm2', sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, model_cache], check=True)


def run_plain_peft(cfg: DictConfig, warmup: int, steps: int, tail: int = 1) -> dict[str, Any]:
    """The reference: ``peft.get_peft_model`` on the decoder body, then the hand-written loop of ``run_plain``."""
    import peft

    from ftlab.models.backbones.llm import LLAMA_TARGETS

    backbone, head, datamodule = runners.build_parts(cfg)
    lora = cfg.finetune.peft
    config = peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(LLAMA_TARGETS)
    )
    backbone.model = peft.get_peft_model(backbone.model, config)
    model = runners.Classifier(backbone, head, frozen=0)
    return runners.plain_loop(cfg, model, datamodule, warmup, steps, tail)
