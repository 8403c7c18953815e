"""Evaluation attacks: what ``attack=`` (``conf/attack/``) builds for ``ftlab-eval``.

Each attack is evaluated at one or more strengths (``epsilon`` or ``rate``; 0 is the clean input run through the
attack's own path) and yields ``(logits, labels)`` batch by batch for the run's task to score.

- :class:`GradientAttack` (``attack=fgsm|pgd|embedding_pgd``): white-box attacks that follow the loss's gradient.
  The perturbation code is adversarial training's (:mod:`ftlab.models.adversarial`): the same per-example norms,
  ε-ball projection, clamping to the valid normalised pixel range, embedding hook and seeded random starts; FGSM is
  its PGD with one step of size ε from the clean input.
- :class:`TextPerturbation` (``attack=char_noise|word_deletion|synonyms``): black-box edits of the raw texts of the
  split (:mod:`ftlab.augment.text_ops`), encoded again by the run's data module (``encode``) exactly as training
  encodes its texts. Seeded by (seed, example index): the same edits in every call and for every model.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch

from ftlab.data import unreadable
from ftlab.models.adversarial import NORMS, PGD, site_for
from ftlab.models.backbones.contract import EmbeddingBackbone
from ftlab.utils.errors import ConfigError

SITES = ("pixels", "embeddings")
Outputs = Iterator[tuple[torch.Tensor, torch.Tensor]]


def strengths(values: Any, key: str, upper: float | None = None) -> list[float]:
    """``values`` (a number or a list of numbers) as a list of floats, each checked to be ≥ 0 (and ≤ ``upper``)."""
    items = list(values) if isinstance(values, Iterable) and not isinstance(values, str) else [values]
    if not items:
        raise ConfigError(f"attack.{key}=[]: give at least one value, e.g. attack.{key}=[0,0.1].")
    out = []
    for value in items:
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"attack.{key}={items}: every value must be a number >= 0 (0 = clean inputs).")
        if upper is not None and value > upper:
            raise ConfigError(f"attack.{key}={items}: every value must be at most {upper}.")
        out.append(float(value))
    return out


class Attack:
    """Base of the evaluation attacks: ``name`` names its output folder, ``key`` its strength."""

    name: str
    key: ClassVar[str]

    def __init__(self, values: list[float], seed: int):
        self.values, self.seed = values, int(seed)

    def settings(self) -> dict[str, Any]:
        """What the record states about the attack besides its strengths."""
        return {"seed": self.seed}

    def check(self, module: Any, datamodule: Any) -> None:
        """Raise a :class:`ConfigError` when the run's data or model does not fit this attack."""

    def outputs(
        self, module: Any, datamodule: Any, split: str, strength: float, device: torch.device
    ) -> Outputs:
        raise NotImplementedError


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


class GradientAttack(Attack):
    """FGSM or PGD on the pixels of an image run or on the word embeddings of a text run.

    Args:
        epsilon: radius (one value or a list): L∞ in pixel units ([0, 1] image) or L2 per example on embeddings.
        steps: ascent steps (1 with ``random_start: false`` and ``alpha: null`` is FGSM).
        alpha: step size; ``null``: ``epsilon`` for one step, else ``2.5 * epsilon / steps`` (Madry et al.).
        random_start: start from a seeded uniform point of the ball (Madry et al.) instead of the clean input.
        norm: ``l2`` or ``linf``; ``null``: ``linf`` on pixels, ``l2`` on embeddings.
        site: where the perturbation goes: ``pixels`` or ``embeddings``.
        seed: seeds the random starts with the batch index.
    """

    key = "epsilon"

    def __init__(
        self,
        epsilon: float | list[float],
        steps: int = 10,
        alpha: float | None = None,
        random_start: bool = True,
        norm: str | None = None,
        site: str = "pixels",
        seed: int = 0,
        name: str | None = None,
    ):
        super().__init__(strengths(epsilon, "epsilon"), seed)
        if site not in SITES:
            raise ConfigError(f"attack.site={site!r} is not one of {', '.join(SITES)}.")
        if norm is not None and norm not in NORMS:
            raise ConfigError(
                f"attack.norm={norm!r} is not one of {', '.join(NORMS)} (or null for the default)."
            )
        if int(steps) < 1 or (alpha is not None and not alpha > 0):
            raise ConfigError(f"attack.steps={steps} must be >= 1 and attack.alpha={alpha} > 0 (or null).")
        self.steps, self.alpha, self.random_start, self.site = int(steps), alpha, bool(random_start), site
        self.norm = norm or ("linf" if site == "pixels" else "l2")
        kind = "fgsm" if self.steps == 1 and not self.random_start else "pgd"
        self.name = name or (kind if site == "pixels" else f"embedding_{kind}")

    def settings(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "norm": self.norm,
            "steps": self.steps,
            "alpha": self.alpha,
            "random_start": self.random_start,
            "seed": self.seed,
        }

    def check(self, module: Any, datamodule: Any) -> None:
        modality = getattr(datamodule, "modality", "text")
        if self.site == "pixels" and modality != "image":
            raise ConfigError(
                f"attack={self.name} perturbs pixels, but this run's data is {modality}. For a text run use "
                "attack=embedding_pgd, or a text attack: attack=char_noise, word_deletion or synonyms."
            )
        if self.site == "embeddings" and not isinstance(module.backbone, EmbeddingBackbone):
            raise ConfigError(
                f"attack={self.name} perturbs word embeddings, but the backbone {type(module.backbone).__name__} "
                "exposes none (input_embeddings()). For an image run use attack=fgsm or attack=pgd."
            )

    def adversary(self, epsilon: float) -> PGD:
        """Adversarial training's PGD at ``epsilon`` (FGSM: one step of size ε from the clean input)."""
        alpha = self.alpha or (epsilon if self.steps == 1 else 2.5 * epsilon / self.steps)
        return PGD(epsilon, alpha, self.steps, self.random_start, self.norm, seed=self.seed)

    def outputs(
        self, module: Any, datamodule: Any, split: str, strength: float, device: torch.device
    ) -> Outputs:
        adversary = self.adversary(strength) if strength > 0 else None
        loader = getattr(datamodule, f"{'val' if split == 'validation' else split}_dataloader")()
        # unreadable examples are left out here too (the clean pass names them): the same examples in every pass
        for index, batch in enumerate(unreadable.skipping_loader(loader, [])):
            batch = _to(batch, device)
            site = site_for(module, batch)
            try:
                if adversary is None:  # ε = 0: the clean input through the same site (a zero perturbation)
                    delta = torch.zeros(site.shape, device=site.device)
                else:
                    with torch.enable_grad():
                        delta = adversary.perturbation(module, site, self.norm, index)
                with torch.no_grad():
                    logits = module(site.inputs(delta))
            finally:
                site.close()
            yield logits.detach(), batch["labels"]


TEXT_OPS = ("char_noise", "word_deletion", "synonyms")


class TextPerturbation(Attack):
    """Edits of the raw texts at ``rate``, encoded again by the run's data module (``encode``), as training does.

    Args:
        rate: one rate or a list: ``char_noise``: the chance of each letter to get a typo; ``word_deletion``: of
            each word to go; ``synonyms``: the fraction of words replaced by a WordNet synonym (EDA's α: at least
            one word when > 0).
        op: ``char_noise``, ``word_deletion`` or ``synonyms`` (:mod:`ftlab.augment.text_ops`).
        char_ops: the typos of ``char_noise``: any of ``swap``, ``insert``, ``delete``, ``keyboard``.
        seed: with the example's index, seeds its edits (the same for every rate's draw order and every model).
    """

    key = "rate"

    def __init__(
        self,
        rate: float | list[float],
        op: str = "char_noise",
        char_ops: list[str] | None = None,
        seed: int = 0,
        name: str | None = None,
    ):
        super().__init__(strengths(rate, "rate", upper=1.0), seed)
        from ftlab.augment.text_ops import CHAR_OPS

        if op not in TEXT_OPS:
            raise ConfigError(f"attack.op={op!r} is not one of {', '.join(TEXT_OPS)}.")
        self.char_ops = list(char_ops or CHAR_OPS)
        unknown = [o for o in self.char_ops if o not in CHAR_OPS]
        if unknown:
            raise ConfigError(f"attack.char_ops={self.char_ops}: {unknown} not among {', '.join(CHAR_OPS)}.")
        self.op, self.name = op, name or op

    def settings(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "seed": self.seed,
            **({"char_ops": self.char_ops} if self.op == "char_noise" else {}),
        }

    def check(self, module: Any, datamodule: Any) -> None:
        if getattr(datamodule, "modality", "text") != "text" or not hasattr(datamodule, "raw_inputs"):
            raise ConfigError(
                f"attack={self.name} edits raw texts, but this run's data is "
                f"{getattr(datamodule, 'modality', type(datamodule).__name__)} ({type(datamodule).__name__}). "
                "For an image run use attack=fgsm or attack=pgd."
            )
        if module.task.level != "sequence":
            raise ConfigError(
                f"attack={self.name} changes words, so the per-token labels of a {module.task.name} run would no "
                "longer line up; use attack=embedding_pgd for this run."
            )

    def perturb(self, text: str, rate: float, rng: random.Random) -> str:
        from ftlab.augment import text_ops

        if self.op == "char_noise":
            return text_ops.char_noise(text, rate, rng, self.char_ops)
        if self.op == "word_deletion":
            return text_ops.word_deletion(text, rate, rng)
        return text_ops.synonym_replacement(text, rate, rng)

    def perturbed(self, texts: list[str], rate: float, which: int) -> list[str]:
        """Each text edited with its own generator, seeded by (seed, index, first or second text of a pair)."""
        return [
            self.perturb(text, rate, random.Random((self.seed * 1_000_003 + i) * 2 + which))
            for i, text in enumerate(texts)
        ]

    def outputs(
        self, module: Any, datamodule: Any, split: str, strength: float, device: torch.device
    ) -> Outputs:
        texts, pairs = datamodule.raw_inputs(split)
        labels = datamodule.datasets[split].labels
        texts = self.perturbed(texts, strength, 0)
        pairs = self.perturbed(pairs, strength, 1) if pairs is not None else None
        collate, size = datamodule.collator(cuda=device.type == "cuda"), datamodule.eval_batch_size
        with torch.inference_mode():
            for start in range(0, len(texts), size):
                end = min(start + size, len(texts))
                items = datamodule.encode(texts[start:end], pairs[start:end] if pairs else None)
                for i, item in enumerate(items):
                    item["labels"] = labels[start + i]
                batch = _to(collate(items), device)
                yield module(batch), batch["labels"]
