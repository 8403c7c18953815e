"""Causal language modelling on instruction data (``data.task=causal_lm``): loss on the response tokens only.

Batches carry ``input_ids`` (prompt + response, chat template applied) and ``labels`` (B, T): the token ids of
the response and :data:`IGNORE_INDEX` on the prompt and the padding, aligned with ``input_ids`` as in HF (labels
= input ids); the task shifts them once (logits at t score the token at t + 1). The "head" is the model's own LM
head (:class:`~ftlab.models.backbones.causal_lm.HFCausalLM`), so logits are (B, T, V).

Metrics per stage: ``perplexity`` (exp of the mean response-token loss, torchmetrics), ``token_acc``
(teacher-forced next-token accuracy on response tokens) and, at validation and test, ``exact_match`` and ``f1``
of greedy generations for the first ``generate_examples`` examples of the split against their references. The
test stage's generations, each with its prompt, reference and scores, go to ``generations_test.jsonl`` in the run
folder (rank 0's share under DDP), so what the scores count can be read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torchmetrics
from torchmetrics.text import Perplexity

from ftlab import generation
from ftlab.tasks.base import IGNORE_INDEX, Evaluator, Task, per_token_cross_entropy
from ftlab.utils.errors import ConfigError


@runtime_checkable
class GenerativeTask(Protocol):
    """A task that scores generated text at validation/test (the module calls it after each step) and predicts
    by generating."""

    def generation_step(self, module: Any, batch: dict[str, torch.Tensor], metrics: Any) -> None: ...

    def generate_rows(
        self, module: Any, batch: dict[str, torch.Tensor], items: Sequence[dict[str, Any]], **options: Any
    ) -> list[dict[str, Any]]: ...


class GenerationScores(torchmetrics.Metric):
    """Exact match and token F1 of generated answers; nothing is reported for a stage that generated nothing."""

    full_state_update = False
    em: torch.Tensor
    f1: torch.Tensor
    count: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        for state in ("em", "f1", "count"):
            self.add_state(state, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], references: Sequence[str]) -> None:
        for pred, ref in zip(predictions, references, strict=True):
            self.em += float(generation.exact_match(pred, ref))
            self.f1 += generation.token_f1(pred, ref)
        self.count += len(predictions)

    def compute(self) -> dict[str, torch.Tensor]:
        if self.count == 0:
            return {}
        return {"exact_match": (self.em / self.count).float(), "f1": (self.f1 / self.count).float()}


class TokenAccuracy(torchmetrics.Metric):
    """Share of scored positions whose most likely next token is the reference token (teacher forcing)."""

    full_state_update = False
    correct: torch.Tensor
    total: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        for state in ("correct", "total"):
            self.add_state(state, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        scored = labels != IGNORE_INDEX
        self.correct += (logits.argmax(-1)[scored] == labels[scored]).sum()
        self.total += scored.sum()

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp(min=1)


def shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T-1, V) logits of positions 0..T-2 and (B, T-1) labels of tokens 1..T-1: what each position predicts."""
    return logits[:, :-1], labels[:, 1:]


def last_response(labels_row: torch.Tensor) -> tuple[int, int]:
    """``[start, end)`` of the last run of scored positions (the final assistant turn); (-1, -1) if none."""
    scored = (labels_row != IGNORE_INDEX).nonzero().flatten().tolist()
    if not scored:
        return -1, -1
    end = scored[-1] + 1
    start = end - 1
    while start > 0 and int(labels_row[start - 1]) != IGNORE_INDEX:
        start -= 1
    return start, end


class CausalLMTask(Task):
    """Next-token cross-entropy on response tokens; generation scores at validation/test.

    Args:
        num_labels: the tokenizer's vocabulary size.
        max_new_tokens: the longest generation when scoring and predicting (default 32).
        generate_examples: generations scored per validation/test epoch, from the split's start (default 64;
            0 turns generation scores off).
    """

    name = "causal_lm"
    monitor = "val/loss"
    level = "token"

    def __init__(
        self,
        num_labels: int,
        label_names: Sequence[str] | None = None,
        max_new_tokens: int = 32,
        generate_examples: int = 64,
    ):
        super().__init__(num_labels, None)
        if int(max_new_tokens) < 1:
            raise ConfigError(f"module.max_new_tokens={max_new_tokens} must be at least 1.")
        if int(generate_examples) < 0:
            raise ConfigError(
                f"module.generate_examples={generate_examples} must be >= 0 (0: no generation)."
            )
        self.max_new_tokens, self.generate_examples = int(max_new_tokens), int(generate_examples)
        self._tokenizer: Any = None
        self.test_generations: list[dict[str, Any]] = []  # the last test epoch's, for write_files

    def hparams(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "generate_examples": self.generate_examples}

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # mean over scored tokens of the batch; a batch without any (all truncated away) gives 0, not NaN
        logits, labels = shift(logits, labels)
        return per_token_cross_entropy(logits.float(), labels)

    def metrics(self) -> torchmetrics.MetricCollection:
        return torchmetrics.MetricCollection(
            {
                "perplexity": Perplexity(ignore_index=IGNORE_INDEX),
                "token_acc": TokenAccuracy(),
                "generation": GenerationScores(),
            }
        )

    def update_metrics(self, metrics: Any, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits, labels = shift(logits, labels)
        metrics["perplexity"].update(logits.float(), labels)
        metrics["token_acc"].update(logits, labels)
        metrics["generation"].update([], [])  # counted as updated; scored by generation_step

    def hard(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)  # (B, T) the most likely next token per position

    # --- generation -------------------------------------------------------------------------------------------
    def tokenizer(self, module: Any) -> Any:
        if self._tokenizer is None:
            from ftlab.data.text import load_tokenizer

            self._tokenizer = load_tokenizer(module.backbone.preprocessing.tokenizer)
        return self._tokenizer

    def generation_step(self, module: Any, batch: dict[str, torch.Tensor], metrics: Any) -> None:
        """Greedy generations for this batch's examples (until ``generate_examples`` were scored this epoch),
        scored against the final response of each; prompts are the tokens before that response."""
        scores: GenerationScores = metrics["generation"]
        room = self.generate_examples - int(scores.count)
        if room <= 0:
            return
        tokenizer = self.tokenizer(module)
        prompts, references = [], []
        for ids, labels in zip(batch["input_ids"][:room], batch["labels"][:room], strict=True):
            start, end = last_response(labels)
            if start <= 0:
                continue  # the response was truncated away, or there is no prompt
            prompts.append(ids[:start].cpu())
            references.append(tokenizer.decode(ids[start:end], skip_special_tokens=True).strip())
        if not prompts:
            return
        new = generation.generate(module.backbone.model, tokenizer, prompts, self.max_new_tokens)
        outputs = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in new]
        trainer = getattr(module, "_trainer", None)
        if trainer is not None and trainer.testing:
            if int(scores.count) == 0:  # the first scored batch of a test epoch
                self.test_generations = []
            self.test_generations += [
                {
                    "prompt": tokenizer.decode(prompt, skip_special_tokens=True),
                    "reference": reference,
                    "output": output,
                    "exact_match": generation.exact_match(output, reference),
                    "f1": round(generation.token_f1(output, reference), 4),
                }
                for prompt, reference, output in zip(prompts, references, outputs, strict=True)
            ]
        scores.update(outputs, references)

    def write_files(self, run_dir: Path) -> None:
        """``generations_test.jsonl``: the test stage's scored generations, one JSON object a line."""
        from ftlab.runs.folder import GENERATIONS_FILE
        from ftlab.utils.safe_files import write_text

        if self.test_generations:
            lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in self.test_generations)
            write_text(run_dir / GENERATIONS_FILE, lines)

    def generate_rows(
        self,
        module: Any,
        batch: dict[str, torch.Tensor],
        items: Sequence[dict[str, Any]],
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
    ) -> list[dict[str, Any]]:
        """``ftlab-predict``: one row per prompt with the generated ``response`` and its token count."""
        tokenizer = self.tokenizer(module)
        mask = batch["attention_mask"].bool()
        prompts = [ids[row_mask].cpu() for ids, row_mask in zip(batch["input_ids"], mask, strict=True)]
        limit = max_new_tokens or self.max_new_tokens
        new = generation.generate(module.backbone.model, tokenizer, prompts, limit, temperature)
        return [
            {
                "input": item["input"],
                "response": tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                "new_tokens": len(tokens),
            }
            for item, tokens in zip(items, new, strict=True)
        ]

    def decode(
        self, logits: torch.Tensor, items: Sequence[dict[str, Any]], top_k: int = 1
    ) -> list[dict[str, Any]]:
        raise ConfigError(
            "A causal_lm run predicts by generating text, which needs the model, not only its logits: use "
            "ftlab-predict (it calls generate_rows)."
        )

    def evaluator(self) -> Evaluator:
        return Evaluator(self)  # perplexity and loss; generation scores come from ftlab-train's test stage
