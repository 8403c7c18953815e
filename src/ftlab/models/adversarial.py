"""Adversarial training: each training step also trains on inputs perturbed to raise the loss.

``adversarial=fgm|pgd|freelb`` (``conf/adversarial/``) builds one :class:`Adversary`; ``FinetuneModule.training_step``
hands it the batch when it is set. The perturbation ``delta`` is added to the word embeddings of a text backbone
(:class:`~ftlab.models.backbones.contract.EmbeddingBackbone`: a forward hook adds it to the embedding module's
output, which is what HF's ``inputs_embeds`` would carry) or to ``pixel_values`` of an image batch.

How it fits Lightning: automatic optimization is kept. The step runs its extra forward passes itself and takes the
gradient with respect to ``delta`` only (``torch.autograd.grad(loss, delta)``), then returns one loss (clean plus
adversarial terms) on which Lightning runs the single backward of the step. So gradient accumulation (Lightning
divides the returned loss), mixed precision (Lightning scales that backward; the inner gradients are taken from the
loss times the GradScaler's scale, and only their direction is used), gradient clipping (also the fused-optimizer
clipping of ``models/clipping.py``), the policy's frozen groups and PEFT adapters all work as in plain training:
parameters get gradients in one backward per step. Under DDP the inner passes run inside DDP's forward and never
accumulate parameter gradients, so gradients are all-reduced once per step with no ``no_sync`` needed.
The price: FreeLB keeps the graphs of its ``steps`` adversarial passes until that backward (activation memory grows
with ``steps``); FGM and PGD keep two graphs (clean and final adversarial).

Norms are per example: ``l2`` over all of an example's (token, hidden) entries (padding tokens are never
perturbed), ``linf`` per entry in pixel units (the image's [0, 1] scale: ``epsilon=8/255`` is the usual CIFAR
setting), and ``x + delta`` is kept inside the valid range of the normalised pixels. Random starts are drawn from
a generator seeded by (seed, epoch, batch index, rank), so a resumed run perturbs exactly as the uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch

from ftlab.models.backbones.contract import EmbeddingBackbone
from ftlab.utils.errors import ConfigError

NORMS = ("l2", "linf")
# epsilon: null in the configs: L2 per example on word embeddings (a tenth of one token's embedding norm in MiniLM,
# mean 1.07; at 0.3 and 1.0 FGM training of MiniLM on 1,000 reviews stalled at the majority class after one epoch,
# docs/robustness.md), L-inf per pixel on images (the usual CIFAR radius)
DEFAULT_EPSILON = {"embeddings": 0.1, "pixels": 8 / 255}


def _l2(x: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each example, shaped (B, 1, ..., 1)."""
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))


def direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent unit step under ``norm``: ``g / ||g||_2`` per example, or ``sign(g)``."""
    grad = torch.nan_to_num(grad.float(), nan=0.0, posinf=0.0, neginf=0.0)  # an fp16 overflow: no step
    if norm == "linf":
        return grad.sign()
    return grad / _l2(grad).clamp_min(1e-20)


def project(delta: torch.Tensor, epsilon: float, norm: str) -> torch.Tensor:
    """``delta`` moved into the ε-ball: per-example L2 rescaling, or per-entry clamping for L∞."""
    if norm == "linf":
        return delta.clamp(-epsilon, epsilon)
    return delta * (epsilon / _l2(delta).clamp_min(1e-20)).clamp(max=1.0)


class EmbeddingSite:
    """Perturbs the word embeddings: a forward hook adds ``delta`` (B, T, H) to the embedding module's output."""

    def __init__(self, backbone: EmbeddingBackbone, batch: dict[str, torch.Tensor]):
        self.batch, self.embeddings = batch, backbone.input_embeddings()
        ids = batch["input_ids"]
        width = int(self.embeddings.weight.shape[1])  # type: ignore[index]
        self.shape = (*ids.shape, width)
        self.device = ids.device
        mask = batch.get("attention_mask")
        self.mask = (torch.ones_like(ids) if mask is None else mask).unsqueeze(-1).float()  # (B, T, 1)
        self.delta: torch.Tensor | None = None
        self.handle = self.embeddings.register_forward_hook(self._add)

    def _add(self, module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        if self.delta is None:
            return None
        # masked here, so the gradient at padding tokens is exactly zero and never takes a share of the norm
        return output + (self.delta * self.mask).to(output.dtype)

    def inputs(self, delta: torch.Tensor | None) -> dict[str, torch.Tensor]:
        self.delta = delta
        return self.batch

    def valid(self, delta: torch.Tensor) -> torch.Tensor:
        return delta * self.mask  # padding tokens stay as they are

    def close(self) -> None:
        self.handle.remove()
        self.delta = None


class PixelSite:
    """Perturbs ``pixel_values`` (B, C, H, W); ``delta`` is in pixel units ([0, 1] scale) so ε reads as usual."""

    def __init__(self, batch: dict[str, torch.Tensor], mean: Any, std: Any):
        self.batch = batch
        x = batch["pixel_values"]
        self.shape, self.device = tuple(x.shape), x.device
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        if self.mean.shape[1] not in (1, x.shape[1]):
            raise ConfigError(
                f"adversarial: the backbone's preprocessing has {self.mean.shape[1]} channel means and the images "
                f"{x.shape[1]} channels; the image perturbation needs one mean/std per channel."
            )
        self.pixels = x.float() * self.std + self.mean  # the [0, 1] image

    def inputs(self, delta: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if delta is None:
            return self.batch
        x = self.batch["pixel_values"]
        return {**self.batch, "pixel_values": (x.float() + delta / self.std).to(x.dtype)}

    def valid(self, delta: torch.Tensor) -> torch.Tensor:
        return (self.pixels + delta).clamp(0.0, 1.0) - self.pixels  # the perturbed image stays an image

    def close(self) -> None:
        pass


def site_for(module: Any, batch: dict[str, torch.Tensor]) -> EmbeddingSite | PixelSite:
    """Where this batch is perturbed: its pixels, or the word embeddings of an :class:`EmbeddingBackbone`."""
    if "features" in batch or "hidden_states" in batch:
        raise ConfigError(
            "adversarial training perturbs the backbone's inputs, but this batch holds cached features "
            "(feature_cache): run with feature_cache=false."
        )
    if "pixel_values" in batch:
        pre = module.backbone.preprocessing
        return PixelSite(batch, getattr(pre, "mean", (0.0,)), getattr(pre, "std", (1.0,)))
    if isinstance(module.backbone, EmbeddingBackbone):
        return EmbeddingSite(module.backbone, batch)
    raise ConfigError(
        f"adversarial: the backbone {type(module.backbone).__name__} exposes no word embeddings (input_embeddings(), "
        "ftlab.models.backbones.contract.EmbeddingBackbone) and the batch has no pixel_values; remove adversarial=."
    )


class Adversary:
    """Base of the adversarial training methods.

    Args:
        epsilon: radius of the perturbation ball (per example; L2 on embeddings, L∞ in pixel units on images).
        norm: ``l2`` or ``linf``; ``null``: ``l2`` on word embeddings, ``linf`` on pixels.
        clean_loss: add the clean loss to the adversarial one (``False``: train on perturbed inputs only).
        seed: seeds the random starts together with (epoch, batch index, rank).
    """

    needs_clean_grad = False  # whether the clean pass's gradient with respect to delta is used

    def __init__(
        self, epsilon: float | None = None, norm: str | None = None, clean_loss: bool = True, seed: int = 0
    ):
        if epsilon is not None and not epsilon > 0:
            raise ConfigError(
                f"adversarial.epsilon={epsilon} must be > 0 (the radius of the perturbation), or null for the "
                f"default of the perturbed input ({DEFAULT_EPSILON})."
            )
        if norm is not None and norm not in NORMS:
            raise ConfigError(f"adversarial.norm={norm!r} is not one of l2, linf (or null for the default).")
        self.norm, self.clean_loss, self.seed = norm, clean_loss, int(seed)
        self.epsilon_setting = None if epsilon is None else float(epsilon)
        self.epsilon = (
            self.epsilon_setting if self.epsilon_setting is not None else DEFAULT_EPSILON["embeddings"]
        )

    def resolve(self, site: Any) -> None:
        """The radius (and what follows from it) for ``site`` when the config left ``epsilon`` null."""
        if self.epsilon_setting is None:
            self.epsilon = DEFAULT_EPSILON["pixels" if isinstance(site, PixelSite) else "embeddings"]

    def training_loss(self, module: Any, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The step's loss; the module logs the clean loss and metrics (``module._step``) as in plain training."""
        site = site_for(module, batch)
        self.resolve(site)
        norm = self.norm or ("linf" if isinstance(site, PixelSite) else "l2")
        try:
            zero = torch.zeros(site.shape, device=site.device, requires_grad=self.needs_clean_grad)
            clean = module._step(site.inputs(zero if self.needs_clean_grad else None), "train")
            adversarial = self.attack(module, site, norm, clean, zero, batch_idx)
        finally:
            site.close()
        return clean + adversarial if self.clean_loss else adversarial

    def attack(
        self, module: Any, site: Any, norm: str, clean: torch.Tensor, zero: torch.Tensor, batch_idx: int
    ) -> torch.Tensor:
        raise NotImplementedError

    # --- shared pieces ------------------------------------------------------------------------------------------
    def loss_at(self, module: Any, site: Any, delta: torch.Tensor) -> torch.Tensor:
        return module.loss(module(site.inputs(delta)), site.batch["labels"])

    def grad(self, module: Any, loss: torch.Tensor, delta: torch.Tensor, retain: bool) -> torch.Tensor:
        """d loss / d delta; under fp16 from the loss times the GradScaler's scale (only the direction is used)."""
        trainer = getattr(module, "_trainer", None)
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        scale = scaler.get_scale() if scaler is not None else 1.0
        (grad,) = torch.autograd.grad(loss * scale, delta, retain_graph=retain)
        return grad

    def step(
        self, site: Any, delta: torch.Tensor, size: float, grad: torch.Tensor, norm: str
    ) -> torch.Tensor:
        """One ascent step of ``size`` along ``grad``, projected into the ε-ball and the valid inputs."""
        moved = delta.detach() + size * direction(grad, norm)
        return site.valid(project(moved, self.epsilon, norm)).detach()

    def start(self, module: Any, site: Any, norm: str, radius: float, batch_idx: int) -> torch.Tensor:
        """A random start in the ball of ``radius``, from a generator seeded by (seed, epoch, batch, rank)."""
        trainer = getattr(module, "_trainer", None)
        epoch, rank = (trainer.current_epoch, trainer.global_rank) if trainer is not None else (0, 0)
        seed = ((self.seed * 1_000_003 + epoch) * 1_000_003 + batch_idx) * 1_009 + rank
        generator = torch.Generator(device=site.device).manual_seed(seed % 2**63)
        if norm == "linf":
            delta = (torch.rand(site.shape, generator=generator, device=site.device) * 2 - 1) * radius
        else:
            noise = site.valid(torch.randn(site.shape, generator=generator, device=site.device))
            per_example = (site.shape[0],) + (1,) * (len(site.shape) - 1)
            radii = torch.rand(per_example, generator=generator, device=site.device) * radius
            delta = noise / _l2(noise).clamp_min(1e-20) * radii
        return site.valid(project(delta, self.epsilon, norm))


class FGM(Adversary):
    """Fast gradient method (Miyato et al. 2017): one step of exactly ``epsilon`` (per example) along the clean
    loss's gradient with respect to the input; the loss is clean + adversarial (``clean_loss``)."""

    needs_clean_grad = True

    def attack(
        self, module: Any, site: Any, norm: str, clean: torch.Tensor, zero: torch.Tensor, batch_idx: int
    ) -> torch.Tensor:
        delta = self.epsilon * direction(self.grad(module, clean, zero, retain=True), norm)
        return self.loss_at(module, site, site.valid(delta).detach())


class PGD(Adversary):
    """Projected gradient descent (Madry et al. 2018): ``steps`` ascent steps of size ``alpha`` projected into the
    ε-ball, from a random start (``random_start``) or from the clean input; trains on the last perturbation.

    Args:
        alpha: step size (L2 per example on embeddings; per entry, pixel units, with ``linf``); ``None``:
            2.5 ε / K (Madry et al.'s rule).
        steps: ascent steps K.
        random_start: start from a uniform point of the ball (Madry et al.) instead of the clean input.
    """

    def __init__(
        self,
        epsilon: float | None = None,
        alpha: float | None = None,
        steps: int = 3,
        random_start: bool = True,
        norm: str | None = None,
        clean_loss: bool = True,
        seed: int = 0,
    ):
        super().__init__(epsilon, norm, clean_loss, seed)
        if (alpha is not None and not alpha > 0) or steps < 1:
            raise ConfigError(
                f"adversarial.alpha={alpha} must be > 0 (or null: 2.5 epsilon / steps) and "
                f"adversarial.steps={steps} >= 1."
            )
        self.alpha_setting, self.steps, self.random_start = alpha, int(steps), random_start
        self.alpha = 0.0
        self.resolve(None)
        self.needs_clean_grad = not random_start  # the first step from the clean input reuses the clean pass

    def resolve(self, site: Any) -> None:
        if site is not None:
            super().resolve(site)
        self.alpha = float(self.alpha_setting) if self.alpha_setting else 2.5 * self.epsilon / self.steps

    def attack(
        self, module: Any, site: Any, norm: str, clean: torch.Tensor, zero: torch.Tensor, batch_idx: int
    ) -> torch.Tensor:
        return self.loss_at(module, site, self.perturbation(module, site, norm, batch_idx, clean, zero))

    def perturbation(
        self,
        module: Any,
        site: Any,
        norm: str,
        batch_idx: int,
        clean: torch.Tensor | None = None,
        zero: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The last PGD perturbation (detached); also the evaluation attacks' (:mod:`ftlab.robustness`), which
        pass no ``clean``/``zero``: the clean loss is then computed here when the first step needs it."""
        if self.random_start:
            delta = self.start(module, site, norm, self.epsilon, batch_idx)
        else:
            if clean is None or zero is None:
                zero = torch.zeros(site.shape, device=site.device, requires_grad=True)
                clean = self.loss_at(module, site, zero)
            delta = self.step(site, zero, self.alpha, self.grad(module, clean, zero, retain=True), norm)
        for _ in range(self.steps - (0 if self.random_start else 1)):
            delta.requires_grad_(True)
            grad = self.grad(module, self.loss_at(module, site, delta), delta, retain=False)
            delta = self.step(site, delta, self.alpha, grad, norm)
        return delta


class FreeLB(Adversary):
    """FreeLB (Zhu et al. 2020): ``steps`` ascent steps whose losses are averaged into the step's loss (the
    parameter gradients of every step accumulate, as in the paper), plus the clean loss (``clean_loss``, which
    users found necessary).

    Args:
        alpha: ascent step size (per example L2 on embeddings); ``None``: ε / K.
        steps: ascent steps K (the paper: 2-3 on GLUE).
        init_magnitude: radius of the random start, at most ε (0: start from the clean input).
    """

    def __init__(
        self,
        epsilon: float | None = None,
        alpha: float | None = None,
        steps: int = 3,
        init_magnitude: float = 0.0,
        norm: str | None = None,
        clean_loss: bool = True,
        seed: int = 0,
    ):
        super().__init__(epsilon, norm, clean_loss, seed)
        if (alpha is not None and not alpha > 0) or steps < 1 or init_magnitude < 0:
            raise ConfigError(
                f"adversarial.alpha={alpha} must be > 0 (or null: epsilon / steps), adversarial.steps={steps} "
                f">= 1 and adversarial.init_magnitude={init_magnitude} >= 0."
            )
        self.alpha_setting, self.steps, self.init_magnitude = alpha, int(steps), float(init_magnitude)
        self.alpha = 0.0
        self.resolve(None)

    def resolve(self, site: Any) -> None:
        if site is not None:
            super().resolve(site)
        self.alpha = float(self.alpha_setting) if self.alpha_setting else self.epsilon / self.steps

    def attack(
        self, module: Any, site: Any, norm: str, clean: torch.Tensor, zero: torch.Tensor, batch_idx: int
    ) -> torch.Tensor:
        if self.init_magnitude > 0:
            delta = self.start(module, site, norm, min(self.init_magnitude, self.epsilon), batch_idx)
        else:
            delta = torch.zeros_like(zero)
        total = clean.new_zeros(())
        for t in range(self.steps):
            delta.requires_grad_(True)
            loss = self.loss_at(module, site, delta)
            total = total + loss / self.steps  # its graph is kept: Lightning's backward accumulates all K
            if t < self.steps - 1:
                delta = self.step(site, delta, self.alpha, self.grad(module, loss, delta, retain=True), norm)
        return total
