"""One tag per word: named entities (BIO / IOB2 / BIOES, scored per entity with ``seqeval``) or part of speech
(scored per token).

Batches carry ``labels`` (B, T): the word's tag id on its first subtoken, :data:`IGNORE_INDEX` on the other
subtokens, the special tokens and the padding (``data.label_all_subtokens`` labels every subtoken). Metrics and
predictions read only the labelled positions, so they are word-level.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torchmetrics

from ftlab.tasks.base import IGNORE_INDEX, Evaluator, Task, per_token_cross_entropy
from ftlab.utils.errors import ConfigError
from ftlab.utils.safe_files import write_frame

# user spelling -> seqeval's scheme class name (used for strict matching and for the scheme check)
SCHEMES = {"BIO": "IOB2", "IOB2": "IOB2", "BIOES": "IOBES", "IOBES": "IOBES"}
ENTITY_TAG = re.compile(r"^(O|[BIES]-.+)$")


def looks_like_entities(names: Sequence[str]) -> bool:
    """Whether every tag is ``O`` or ``B-``/``I-``/``E-``/``S-`` + a type (and some tag is not ``O``)."""
    return any(n != "O" for n in names) and all(ENTITY_TAG.match(n) for n in names)


class TagSequences(torchmetrics.Metric):
    """Keeps the gold and predicted tag ids of every labelled position, and each sequence's length.

    The states are flat tensors concatenated across batches (and gathered across ranks: ``dist_reduce_fx="cat"``
    keeps each rank's preds, targets and lengths in the same order), so sequences are rebuilt exactly in
    ``compute``. Entity mode: seqeval's entity-level micro precision/recall/F1 plus token accuracy; token mode
    (POS): token accuracy and macro F1 over the tags that occur in the gold or predicted tags.
    """

    full_state_update = False
    preds: list[torch.Tensor]
    target: list[torch.Tensor]
    lengths: list[torch.Tensor]

    def __init__(self, names: Sequence[str], entities: bool, scheme: str, strict: bool):
        super().__init__()
        self.names, self.entities, self.scheme, self.strict = list(names), entities, scheme, strict
        for state in ("preds", "target", "lengths"):
            self.add_state(state, default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """``preds``, ``target``: (B, T) tag ids; positions where ``target`` is IGNORE_INDEX are not scored."""
        mask = target != IGNORE_INDEX
        self.preds.append(preds[mask])
        self.target.append(target[mask])
        self.lengths.append(mask.sum(1))

    def _flat(self, name: str) -> torch.Tensor:
        state = getattr(self, name)
        if isinstance(state, torch.Tensor):  # after a cross-rank sync the list is one tensor
            return state
        return torch.cat(state) if state else torch.zeros(0, dtype=torch.long)

    def sequences(self) -> tuple[list[list[str]], list[list[str]]]:
        """(gold, predicted) tag names per sequence."""
        lengths = self._flat("lengths").tolist()
        gold = self._flat("target").split(lengths)
        pred = self._flat("preds").split(lengths)
        names = self.names
        return [[names[i] for i in g.tolist()] for g in gold], [[names[i] for i in p.tolist()] for p in pred]

    def seqeval_kwargs(self) -> dict[str, Any]:
        if not self.strict:
            return {}  # conlleval's lenient reading: an I- after O starts an entity
        from seqeval import scheme

        return {"mode": "strict", "scheme": getattr(scheme, self.scheme)}

    def compute(self) -> dict[str, torch.Tensor]:
        gold, pred = self._flat("target"), self._flat("preds")
        acc = (gold == pred).float().mean() if len(gold) else torch.tensor(0.0)
        if not self.entities:
            from sklearn.metrics import f1_score

            f1 = f1_score(gold.numpy(), pred.numpy(), average="macro", zero_division=0) if len(gold) else 0.0
            return {"acc": acc, "f1": torch.tensor(float(f1))}
        from seqeval import metrics

        gold_tags, pred_tags = self.sequences()
        kw = {**self.seqeval_kwargs(), "zero_division": 0}
        with warnings.catch_warnings():  # seqeval warns about sequences without entities
            warnings.simplefilter("ignore")
            scores = {
                name: float(fn(gold_tags, pred_tags, **kw))
                for name, fn in (
                    ("precision", metrics.precision_score),
                    ("recall", metrics.recall_score),
                    ("f1", metrics.f1_score),
                )
            }
        return {"acc": acc, **{k: torch.tensor(v) for k, v in scores.items()}}


class TokenClassificationTask(Task):
    """A tag per word (NER, POS): per-token cross-entropy, entity-level or token-level metrics.

    Args:
        entities: ``auto`` (entity metrics and spans when every tag is ``O`` or ``B-``/``I-``/``E-``/``S-`` +
            type), ``true`` or ``false`` (token accuracy and macro F1, e.g. POS tags).
        scheme: ``auto`` (``BIOES`` when an ``E-``/``S-`` tag exists, else ``BIO``), ``BIO``/``IOB2`` or
            ``BIOES``/``IOBES``.
        strict: seqeval's strict mode: an entity counts only when well formed in the scheme; default off
            (conlleval's reading, the usual one for reported NER F1).
    """

    name = "token_classification"
    monitor = "val/f1"
    level = "token"

    def __init__(
        self,
        num_labels: int,
        label_names: Sequence[str] | None = None,
        entities: bool | str = "auto",
        scheme: str = "auto",
        strict: bool = False,
    ):
        super().__init__(num_labels, label_names)
        names = self.label_names or [str(i) for i in range(num_labels)]
        self.label_names = names
        if entities not in ("auto", True, False):
            raise ConfigError(f"module.entities={entities!r}: use auto, true or false.")
        if entities == "auto":
            entities = looks_like_entities(names)
        elif entities and not looks_like_entities(names):
            bad = [n for n in names if not ENTITY_TAG.match(n)][:5]
            raise ConfigError(
                f"module.entities=true needs tags O / B-<type> / I-<type> (/ E- / S-); these tags are not: {bad}. "
                "Use module.entities=false (token accuracy and macro F1) or fix the tags."
            )
        if scheme == "auto":
            scheme = "BIOES" if any(n[:2] in ("E-", "S-") for n in names) else "BIO"
        if scheme not in SCHEMES:
            raise ConfigError(f"module.scheme={scheme!r} is not one of auto, {', '.join(SCHEMES)}.")
        self.entities, self.scheme, self.strict = bool(entities), SCHEMES[scheme], bool(strict)

    def hparams(self) -> dict[str, Any]:
        return {"entities": self.entities, "scheme": self.scheme}

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return per_token_cross_entropy(logits, labels)  # the mean over labelled positions

    def metrics(self) -> torchmetrics.MetricCollection:
        assert self.label_names is not None
        metric = TagSequences(self.label_names, self.entities, self.scheme, self.strict)
        return torchmetrics.MetricCollection({"tags": metric})

    def update_metrics(self, metrics: Any, logits: torch.Tensor, labels: torch.Tensor) -> None:
        metrics.update(logits.argmax(-1), labels)

    def hard(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)  # (B, T) tag ids

    def decode(
        self, logits: torch.Tensor, items: Sequence[dict[str, Any]], top_k: int = 1
    ) -> list[dict[str, Any]]:
        """Per input: its words, a tag (and its probability) per word, and for entity tags the entities with
        their text, type and character offsets ``[start, end)`` in the input. A word cut off by ``max_length``
        (or one the tokenizer drops) gets the tag ``null``."""
        from seqeval.metrics.sequence_labeling import get_entities

        names = self.label_names or []
        probs = logits.float().softmax(-1)
        best_p, best_i = probs.max(-1)  # (B, T)
        rows = []
        for b, item in enumerate(items):
            words, spans = item["words"], item["spans"]
            tags: list[str | None] = [None] * len(words)
            scores: list[float | None] = [None] * len(words)
            for t, word in enumerate(item["word_ids"].tolist()):
                if word >= 0 and tags[word] is None:  # the word's first subtoken carries its tag
                    tags[word], scores[word] = names[int(best_i[b, t])], float(best_p[b, t])
            row: dict[str, Any] = {
                "input": item["input"],
                "words": words,
                "tags": tags,
                "probabilities": scores,
            }
            if self.entities:
                row["entities"] = [
                    {
                        "text": item["input"][spans[start][0] : spans[end][1]],
                        "type": kind,
                        "start": spans[start][0],
                        "end": spans[end][1],
                    }
                    for kind, start, end in get_entities([t or "O" for t in tags])
                ]
            rows.append(row)
        return rows

    def evaluator(self) -> Evaluator:
        return TokenEvaluator(self)


class TokenEvaluator(Evaluator):
    """Writes ``per_entity.csv`` (seqeval's report per entity type) or, for POS-like tags, ``per_tag.csv`` and
    ``confusion_matrix.csv``."""

    def finish(self, out_dir: Path, title: str) -> dict[str, float]:
        import pandas as pd

        from ftlab.tasks.reports import per_class

        values = self.headline()
        metric = cast(TagSequences, self.metrics["tags"])
        task = self.task
        assert isinstance(task, TokenClassificationTask) and task.label_names is not None
        if task.entities:
            from seqeval.metrics import classification_report

            gold, pred = metric.sequences()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report = classification_report(
                    gold, pred, output_dict=True, zero_division=0, **metric.seqeval_kwargs()
                )
            frame = pd.DataFrame(
                [{"entity_type": k, **{m: float(v) for m, v in row.items()}} for k, row in report.items()]
            )
            frame["support"] = frame["support"].astype(int)
            write_frame(out_dir / "per_entity.csv", frame, index=False)
        else:
            preds = metric._flat("preds").numpy()
            gold_ids = metric._flat("target").numpy()
            present = sorted(set(np.unique(gold_ids)) | set(np.unique(preds)))
            names = [task.label_names[i] for i in present]
            remap = {old: new for new, old in enumerate(present)}
            frame, matrix = per_class(
                np.vectorize(remap.get)(preds), np.vectorize(remap.get)(gold_ids), names
            )
            write_frame(out_dir / "per_tag.csv", frame, index=False)
            write_frame(out_dir / "confusion_matrix.csv", matrix)
        print(f"\n{title}\n" + frame.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        return values
