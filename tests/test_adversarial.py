"""Adversarial training (ftlab.models.adversarial): perturbation norms, what trains, and runs through train/CLI."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from finetune_helpers import bert_backbone, make_module, read_probe, text_batch
from finetune_helpers import compose_cfg as compose_train
from finetune_helpers import tiny_run_overrides as finetune_run_overrides
from ftlab.finetuning import FinetunePolicy
from ftlab.models import ClassificationHead
from ftlab.models.adversarial import FGM, PGD, FreeLB
from ftlab.models.backbones import TorchvisionResNet
from ftlab.models.backbones.vision import IMAGENET_MEAN, IMAGENET_STD
from ftlab.models.module import FinetuneModule
from ftlab.tasks import build_task
from ftlab.utils.errors import ConfigError

from conftest import compose_cfg, read_json, run_cli, tiny_text_overrides


def labelled_text(pad_from: int = 6) -> dict[str, torch.Tensor]:
    batch = text_batch()
    batch["attention_mask"][0, pad_from:] = 0  # the first example is padded
    batch["labels"] = torch.tensor([0, 1, 0, 1])
    return batch


def embedding_passes(module, batch, adversary) -> list[torch.Tensor]:
    """The word+position embeddings (B, T, H) entering LayerNorm in each forward pass of one training step: the
    first is the clean pass, the difference of any other from it is that pass's perturbation."""
    seen: list[torch.Tensor] = []
    norm = module.backbone.model.embeddings.LayerNorm
    handle = norm.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    module.adversarial = adversary
    try:
        module.training_step(batch, 0).backward()
    finally:
        handle.remove()
    return seen


@pytest.fixture(scope="module")
def text_module():
    torch.manual_seed(0)
    return make_module(bert_backbone(), FinetunePolicy())


def test_fgm_step_is_epsilon_in_l2_per_example_and_leaves_padding(text_module):
    seen = embedding_passes(text_module, labelled_text(), FGM(epsilon=0.5))
    assert len(seen) == 2  # clean + one adversarial pass
    delta = seen[1] - seen[0]
    assert delta.flatten(1).norm(dim=1).tolist() == pytest.approx([0.5] * 4, rel=1e-5)
    assert delta[0, 6:].abs().max() == 0  # padding tokens are not perturbed


def test_pgd_and_freelb_stay_in_the_ball(text_module):
    seen = embedding_passes(text_module, labelled_text(), PGD(epsilon=0.5, alpha=0.2, steps=3))
    assert len(seen) == 5  # clean, 3 ascent passes from the random start, the final one
    norms = torch.stack([(s - seen[0]).flatten(1).norm(dim=1) for s in seen[1:]])
    assert (norms <= 0.5 + 1e-5).all() and norms[-1].min() > 0.45  # 3 steps of 0.2 reach the boundary
    seen = embedding_passes(text_module, labelled_text(), FreeLB(epsilon=0.3, alpha=0.2, steps=3))
    norms = torch.stack([(s - seen[0]).flatten(1).norm(dim=1) for s in seen[1:]])
    assert len(seen) == 4 and (norms <= 0.3 + 1e-5).all() and norms[0].max() == 0  # zero start


def test_unset_epsilon_and_alpha_follow_the_perturbed_input(text_module):
    """epsilon null: 0.1 in L2 per example on word embeddings (FGM's step is exactly that), 8/255 in L-inf on
    pixels; alpha null: 2.5 epsilon / steps for PGD, epsilon / steps for FreeLB."""
    seen = embedding_passes(text_module, labelled_text(), FGM())
    assert (seen[1] - seen[0]).flatten(1).norm(dim=1).tolist() == pytest.approx([0.1] * 4, rel=1e-5)
    pgd, freelb = PGD(steps=4), FreeLB(steps=2)
    embedding_passes(text_module, labelled_text(), pgd)
    embedding_passes(text_module, labelled_text(), freelb)
    assert (pgd.epsilon, pgd.alpha, freelb.alpha) == pytest.approx((0.1, 0.0625, 0.05))
    image_module = make_module(TorchvisionResNet("tiny_resnet", input_size=16), FinetunePolicy())
    image_module.adversarial = pgd = PGD(steps=4)
    batch = {"pixel_values": torch.randn(2, 3, 16, 16), "labels": torch.tensor([0, 1])}
    image_module.training_step(batch, 0).backward()
    assert (pgd.epsilon, pgd.alpha) == pytest.approx((8 / 255, 2.5 * 8 / 255 / 4))
    with pytest.raises(ConfigError, match="adversarial.alpha=0 must be > 0 .or null"):
        PGD(alpha=0)


def test_random_start_is_seeded_by_batch_not_by_global_state(text_module):
    first = embedding_passes(text_module, labelled_text(), PGD(0.5, 0.2, steps=1, seed=3))
    torch.manual_seed(123)  # the global stream moves (dropout), the start does not
    again = embedding_passes(text_module, labelled_text(), PGD(0.5, 0.2, steps=1, seed=3))
    other = embedding_passes(text_module, labelled_text(), PGD(0.5, 0.2, steps=1, seed=4))
    assert torch.equal(first[1] - first[0], again[1] - again[0])
    assert not torch.allclose(first[1] - first[0], other[1] - other[0])


def test_image_pgd_is_linf_bounded_in_pixel_units_and_stays_an_image():
    torch.manual_seed(0)
    module = make_module(TorchvisionResNet("tiny_resnet", input_size=16), FinetunePolicy())
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    pixels = torch.rand(4, 3, 16, 16)
    pixels[0] = 1.0  # a white image: the perturbation may only darken it
    batch = {"pixel_values": (pixels - mean) / std, "labels": torch.tensor([0, 1, 0, 1])}
    seen: list[torch.Tensor] = []
    conv = module.backbone.model.conv1
    conv.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    module.adversarial = PGD(epsilon=8 / 255, alpha=2 / 255, steps=4)
    module.training_step(batch, 0).backward()
    for perturbed in seen[1:]:
        image = perturbed * std + mean
        assert (image - pixels).abs().max() <= 8 / 255 + 1e-5
        assert image.min() >= -1e-5 and image.max() <= 1 + 1e-5
    final = seen[-1] * std + mean - pixels
    assert final.abs().max() >= 8 / 255 - 1e-5 and (final.abs() > 7.9 / 255).float().mean() > 0.2
    assert final[0].max() <= 1e-5  # the white image was not brightened


def snapshot(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def train_steps(module, adversary, steps: int = 2) -> dict[str, torch.Tensor]:
    module = copy.deepcopy(module)
    module.adversarial = adversary
    optimizer = module.configure_optimizers()
    torch.manual_seed(1)  # the same dropout masks in both runs
    for i in range(steps):
        module.training_step(labelled_text(), i).backward()
        optimizer.step()
        optimizer.zero_grad()
    return snapshot(module)


@pytest.mark.parametrize("finetune", ["freeze_bottom", "lora"])
def test_fgm_training_moves_only_what_the_strategy_trains(finetune):
    torch.manual_seed(0)
    policy = instantiate(compose_train([f"finetune={finetune}"]).finetune)
    module = make_module(bert_backbone(), policy, lr=1e-2)
    start = snapshot(module)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    plain, adversarial = train_steps(module, None), train_steps(module, FGM(epsilon=1.0))
    for name, before in start.items():
        if name in trainable:
            assert not torch.equal(adversarial[name], before), name
        else:  # frozen groups (or LoRA's base weights): bit-identical after adversarial training
            assert torch.equal(adversarial[name], before) and torch.equal(plain[name], before), name
    moved = [n for n in trainable if not torch.allclose(plain[n], adversarial[n], atol=1e-7)]
    assert len(moved) > len(trainable) // 2  # the adversarial term changes the update of most trained tensors
    if finetune == "lora":
        assert all("lora_" in n or n.startswith("head.") for n in trainable)


def test_feature_cache_is_off_and_a_backbone_without_embeddings_is_refused():
    module = make_module(bert_backbone(), FinetunePolicy(freeze_backbone=True))
    module.adversarial = FGM(epsilon=1.0)
    from ftlab.finetuning.feature_cache import frozen_prefix

    assert frozen_prefix(module, 1) == (0, "adversarial training perturbs the backbone's inputs every step")
    with pytest.raises(ConfigError, match="feature_cache=false"):
        module.training_step({"features": torch.zeros(2, 32), "labels": torch.tensor([0, 1])}, 0)
    with pytest.raises(ConfigError, match="adversarial.epsilon"):
        FGM(epsilon=0)


@pytest.mark.slow  # a fresh process (imports) and a run: ~20 s alone, more on a busy machine
def test_cli_text_run_with_fgm(reviews_csv, tmp_path):
    out = tmp_path / "run"
    args = [
        *tiny_text_overrides(reviews_csv, tmp_path),
        "adversarial=fgm",
        "debug=fdr",
        f"hydra.run.dir={out}",
    ]
    done = run_cli("train", args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_json(out / "metrics.json")
    assert "adversarial=fgm" in metrics["overrides"] and metrics["test/loss"] > 0
    assert "_target_: ftlab.models.adversarial.FGM" in (out / ".hydra" / "config.yaml").read_text()


def test_image_run_with_pgd_under_bf16_autocast_and_gradient_accumulation(tmp_path):
    from ftlab.train import train

    overrides = [
        "data=digits",
        "model=tiny_resnet",
        "model.backbone.input_size=16",
        "adversarial=pgd",
        "adversarial.epsilon=0.1",
        "adversarial.alpha=0.05",
        "adversarial.steps=2",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.accumulate_grad_batches=2",  # Lightning divides the adversary's loss, steps every 2 batches
        "trainer.precision=bf16-mixed",  # autocast on CPU: the adversarial passes run under it
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        f"paths.cache_dir={tmp_path}/cache",
        "callbacks.progress_bar.kind=log",
    ]
    cfg = compose_cfg(overrides, tmp_path / "run")
    metrics = train(cfg)
    assert cfg.adversarial._target_ == "ftlab.models.adversarial.PGD"
    assert metrics["test/loss"] > 0 and (tmp_path / "run" / "metrics.json").is_file()
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


TESTS = Path(__file__).resolve().parent

TASK_LABELS = {
    "classification": (3, lambda: torch.tensor([0, 1, 2, 1])),
    "regression": (1, lambda: torch.tensor([0.5, -1.0, 2.0, 0.0])),
    "multilabel": (3, lambda: torch.tensor([[1.0, 0, 1], [0, 0, 0], [0, 1, 0], [1, 1, 1]])),
    "token_classification": (3, lambda: torch.tensor([[0, 1, 2, 0, 1, 2, -100, -100, -100]] * 4)),
}


@pytest.mark.parametrize("task", sorted(TASK_LABELS))
def test_fgm_works_for_every_task(task):
    torch.manual_seed(0)
    count, labels = TASK_LABELS[task]
    the_task = build_task(task, count, None if task == "regression" else ["O", "B-X", "I-X"][:count])
    backbone = bert_backbone()
    head = ClassificationHead(backbone.out_features, the_task.num_outputs)
    module = FinetuneModule(
        backbone, head, FinetunePolicy(), the_task, partial(torch.optim.AdamW, lr=1e-3), adversarial=FGM(0.5)
    )
    batch = {**text_batch(), "labels": labels()}
    if task == "token_classification":
        batch["attention_mask"][:, 6:] = 0
    seen = embedding_passes(module, batch, FGM(0.5))
    delta = seen[1] - seen[0]
    assert delta.flatten(1).norm(dim=1).tolist() == pytest.approx([0.5] * 4, rel=1e-5)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.head.parameters())


@pytest.mark.slow  # two processes: ~40 s alone, minutes on a loaded machine
@pytest.mark.parametrize(("adversary", "averaging", "epochs"), [("freelb", "ema", 1), ("pgd", "swa", 2)])
def test_adversaries_and_averaging_keep_ddp_ranks_identical(tmp_path, adversary, averaging, epochs):
    """Under 2-process CPU DDP (gloo) the adversary's inner passes add no gradient all-reduce of their own: the
    ranks see different batches and still end with the same weights (and the same EMA / SWA average; SWA averages
    from the second epoch)."""
    overrides = tiny_run_overrides_ddp(tmp_path, adversary, averaging, epochs)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)])}
    done = subprocess.run(
        [sys.executable, "-m", "ftlab.train", *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [read_probe(tmp_path / "probe", rank) for rank in (0, 1)]
    assert ranks[0]["state"] == ranks[1]["state"]
    assert ranks[0]["start"]["layer.0"] != ranks[0]["end"]["layer.0"]  # it trained
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert (
        int(last["averaging_state"]["n_averaged"]) > 0
    )  # (best.ckpt may be SWA's epoch 0, before averaging)


def tiny_run_overrides_ddp(tmp_path, adversary: str, averaging: str, epochs: int) -> list[str]:
    base = finetune_run_overrides(tmp_path, tmp_path / "run", tmp_path / "probe")
    base = [o for o in base if not o.startswith(("trainer.devices", "callbacks="))]
    return [
        *base,
        "trainer=ddp_cpu",
        f"trainer.max_epochs={epochs}",
        f"callbacks={averaging}",
        "callbacks.early_stopping=null",
        f"adversarial={adversary}",
        "feature_cache=false",
    ]
