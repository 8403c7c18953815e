"""Knowledge distillation (ftlab.distill): the loss, a teacher run distilled into a student run, the cached
teacher logits (no teacher forward in the student's steps), label mismatches, and shallower students."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ftlab import distill
from ftlab.models.backbones import HFTextBackbone
from ftlab.runs.rebuild import load_run
from ftlab.train import train
from ftlab.utils.errors import ConfigError

from conftest import compose_cfg, tiny_reviews, tiny_text_overrides


def _run(tmp: Path, csv: Path, name: str, extra: list[str]) -> tuple[Path, dict]:
    out = tmp / name
    cfg = compose_cfg(tiny_text_overrides(csv, tmp) + ["trainer.max_epochs=2", *extra], out)
    metrics = train(cfg)
    (out / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")  # what a Hydra run writes; train() alone does not
    return out, metrics


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("teacher")
    csv = tmp / "reviews.csv"
    tiny_reviews().to_csv(csv, index=False)
    run_dir, _ = _run(tmp, csv, "teacher", [])
    return run_dir, csv


def test_loss_is_hintons_formula_by_hand():
    student = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, 3.0]])
    teacher = torch.tensor([[1.0, 0.0, -1.0], [-2.0, 2.0, 1.0]])
    labels = torch.tensor([0, 2])
    alpha, t = 0.3, 4.0
    hard = F.cross_entropy(student, labels)
    p = torch.softmax(teacher / t, -1)
    q = torch.softmax(student / t, -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()  # KL(p_teacher || p_student), mean over the batch
    expected = alpha * hard + (1 - alpha) * t * t * kl
    got = distill.distillation_loss(student, teacher, hard, alpha, t)
    assert torch.allclose(got, expected, atol=1e-6)
    assert distill.distillation_loss(student, teacher, hard, 1.0, t) == hard  # alpha=1: plain CE
    # alpha=0 and the student equal to the teacher: nothing left to learn
    assert distill.distillation_loss(teacher, teacher, hard, 0.0, t).abs() < 1e-6


@pytest.mark.parametrize("alpha, temperature", [(1.5, 2.0), (0.5, 0.0)])
def test_bad_alpha_or_temperature_is_named(alpha, temperature):
    with pytest.raises(ConfigError, match="distill.alpha|distill.temperature"):
        distill.Distiller(torch.nn.Linear(2, 2), alpha, temperature)


def test_student_learns_from_cached_teacher_logits_without_teacher_forward(teacher, tmp_path, monkeypatch):
    run_dir, csv = teacher
    loaded: list = []  # (teacher run, its weights when loaded)
    computed: list = []  # the teacher's passes over the training split
    forwards: list = []  # teacher passes inside the student's training steps
    checked: list = []
    load, compute, loss = distill.load_teacher, distill.compute_teacher_logits, distill.Distiller.loss

    def load_spy(*args):
        run = load(*args)
        loaded.append((run, {k: v.clone() for k, v in run.module.state_dict().items()}))
        return run

    def loss_spy(self, module, logits, batch):
        with torch.no_grad():  # the cached logits are the teacher's own on these very examples
            checked.append(torch.allclose(batch["teacher_logits"], self.teacher(batch), atol=1e-5))
        return loss(self, module, logits, batch)

    monkeypatch.setattr(distill, "load_teacher", load_spy)
    monkeypatch.setattr(
        distill, "compute_teacher_logits", lambda *a: computed.append(compute(*a)) or computed[-1]
    )
    monkeypatch.setattr(distill.Distiller, "teacher_logits", lambda self, batch: forwards.append(1))
    monkeypatch.setattr(distill.Distiller, "loss", loss_spy)
    # DistilBERT's recipe: the student is the teacher's encoder with one layer in two
    student = [
        f"distill.teacher={run_dir}",
        f"model.backbone.checkpoint={run_dir}",
        "model.backbone.num_layers=1",
    ]
    student_dir, metrics = _run(tmp_path, csv, "student", student)
    assert (
        metrics["test/acc"] >= 0.5
        and metrics["total_params"] < loaded[0][0].module.parameter_counts()["total_params"]
    )
    rebuilt = load_run(student_dir).module  # eval/predict/export rebuild the shallower student
    assert rebuilt.backbone.model.config.num_hidden_layers == 1
    assert len(computed) == 1 and computed[0].shape[1] == 2  # one pass over the training split
    assert checked and all(checked)  # every training batch carried the teacher's logits, and the right ones
    assert forwards == []  # no teacher forward in the student's steps
    run, before = loaded[0]
    after = run.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the teacher never moved
    assert not any(p.requires_grad for p in run.module.parameters()) and not run.module.training
    # a second student reads the cached logits from disk: no teacher pass at all
    _run(tmp_path, csv, "student2", student)
    assert len(computed) == 1 and len(loaded) == 2 and forwards == []


def test_mismatched_labels_are_a_clear_error(teacher, tmp_path):
    run_dir, _ = teacher
    frame = tiny_reviews()
    frame["stars"] = frame["stars"].map({"pos": "good", "neg": "bad"})
    csv = tmp_path / "other.csv"
    frame.to_csv(csv, index=False)
    cfg = compose_cfg(tiny_text_overrides(csv, tmp_path) + [f"distill.teacher={run_dir}"], tmp_path / "s")
    with pytest.raises(ConfigError, match=r"\['neg', 'pos'\].*\['bad', 'good'\]"):
        train(cfg)
    with pytest.raises(ConfigError, match="distill.teacher=.*nowhere.*does not exist"):
        distill.load_teacher(tmp_path / "nowhere", None)


def test_uncached_distillation_runs_the_teacher_every_step(teacher, tmp_path, monkeypatch):
    run_dir, csv = teacher
    forwards: list = []
    original = distill.Distiller.teacher_logits

    def spy(self, batch):
        forwards.append(len(batch["labels"]))
        return original(self, batch)

    monkeypatch.setattr(distill.Distiller, "teacher_logits", spy)
    _run(
        tmp_path,
        csv,
        "uncached",
        [f"distill.teacher={run_dir}", "distill.cache=false", "trainer.max_epochs=1"],
    )
    assert sum(forwards) == 64  # one epoch: every training example (80 rows, 10% validation, 10% test) once


def test_num_layers_keeps_every_other_pretrained_layer():
    full = HFTextBackbone("embedded:all-MiniLM-L6-v2")
    student = HFTextBackbone("embedded:all-MiniLM-L6-v2", num_layers=3)
    names = [name for name, _ in student.layer_groups()]
    assert names == ["embeddings", "layer.0", "layer.1", "layer.2"]
    assert student.model.config.num_hidden_layers == 3
    for kept, source in zip(range(3), (0, 2, 4), strict=True):  # DistilBERT-style: one layer in two
        mine, theirs = (
            student.model.encoder.layer[kept].state_dict(),
            full.model.encoder.layer[source].state_dict(),
        )
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    batch = {
        "input_ids": torch.tensor([[101, 2204, 102]]),
        "attention_mask": torch.ones(1, 3, dtype=torch.long),
    }
    assert student(batch).shape == (1, 384)
    with pytest.raises(ConfigError, match="model.backbone.num_layers=7"):
        HFTextBackbone("embedded:all-MiniLM-L6-v2", num_layers=7)


def test_a_thinned_teacher_encoder_keeps_the_chosen_layer(teacher):
    run_dir, _ = teacher
    tiny = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    tiny["max_position_embeddings"] = 128
    kept = HFTextBackbone(
        "embedded:all-MiniLM-L6-v2",
        pretrained=False,
        config_overrides=tiny,
        checkpoint=str(run_dir),
        num_layers=1,
    )
    source = load_run(run_dir).module.backbone
    mine, theirs = kept.model.encoder.layer[0].state_dict(), source.model.encoder.layer[0].state_dict()
    assert len(kept.model.encoder.layer) == 1 and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    embeddings = kept.model.embeddings.word_embeddings.weight
    assert torch.equal(embeddings, source.model.embeddings.word_embeddings.weight)


def test_alpha_one_trains_exactly_as_plain_cross_entropy(teacher, tmp_path):
    run_dir, csv = teacher
    _, plain = _run(tmp_path, csv, "plain", ["trainer.max_epochs=1"])
    _, hard = _run(
        tmp_path, csv, "hard", ["trainer.max_epochs=1", f"distill.teacher={run_dir}", "distill.alpha=1.0"]
    )
    _, soft = _run(
        tmp_path, csv, "soft", ["trainer.max_epochs=1", f"distill.teacher={run_dir}", "distill.alpha=0.0"]
    )
    assert hard["test/loss"] == pytest.approx(plain["test/loss"], abs=1e-6)
    assert soft["test/loss"] != pytest.approx(plain["test/loss"], abs=1e-4)  # the teacher's outputs do steer


def test_transfer_rows_have_the_soft_term_only():
    student = torch.tensor([[2.0, -1.0], [0.0, 1.0], [1.0, 1.0]])
    teacher = torch.tensor([[1.0, 0.0], [-2.0, 2.0], [3.0, 0.0]])
    labels = torch.tensor([0, -1, 1])
    labelled = labels >= 0
    module = type("M", (), {"loss": staticmethod(F.cross_entropy)})()
    distiller = distill.Distiller(torch.nn.Linear(2, 2), alpha=0.4, temperature=3.0)
    batch = {"labels": labels, "teacher_logits": teacher, "labelled": labelled}
    hard = F.cross_entropy(student[labelled], labels[labelled])  # the mean over the labelled rows only
    expected = distill.distillation_loss(student, teacher, hard, 0.4, 3.0)
    assert torch.allclose(distiller.loss(module, student, batch), expected)
    none = {
        "labels": torch.tensor([-1, -1]),
        "teacher_logits": teacher[:2],
        "labelled": torch.tensor([False, False]),
    }
    soft_only = distill.distillation_loss(student[:2], teacher[:2], torch.tensor(0.0), 0.4, 3.0)
    assert torch.allclose(distiller.loss(module, student[:2], none), soft_only)


def test_a_transfer_set_of_unlabelled_texts_is_taught_by_the_teacher(teacher, tmp_path, monkeypatch):
    run_dir, csv = teacher
    texts = [f"an unlabelled review number {i}, {'great' if i % 2 else 'dull'}" for i in range(24)]
    transfer = tmp_path / "transfer.txt"
    transfer.write_text("\n".join(texts) + "\n\n")
    computed: list = []
    batches: list = []
    compute, loss = distill.compute_teacher_logits, distill.Distiller.loss
    monkeypatch.setattr(
        distill, "compute_teacher_logits", lambda *a: computed.append(compute(*a)) or computed[-1]
    )
    monkeypatch.setattr(
        distill.Distiller,
        "loss",
        lambda self, m, z, b: batches.append(b["labelled"].cpu()) or loss(self, m, z, b),
    )
    overrides = [f"distill.teacher={run_dir}", f"distill.transfer={transfer}", "trainer.max_epochs=1"]
    _, metrics = _run(tmp_path, csv, "transfer", overrides)
    assert computed[0].shape == (64 + 24, 2)  # the training split, then the transfer texts
    seen = torch.cat(batches)
    assert (~seen).sum() == 24 and seen.sum() == 64  # one epoch: each labelled and each transfer text once
    assert "test/acc" in metrics
    with pytest.raises(ConfigError, match="distill.transfer=.*no such file"):
        distill.read_transfer(tmp_path / "missing.txt")
