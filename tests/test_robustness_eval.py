"""Robustness evaluation (``ftlab-eval attack=...``): clean vs attacked metrics on a tiny image and a tiny text run.

The attacked numbers are checked against what the attack must do (never above clean; a large PGD ε breaks a
model; ε = 0 and rate 0 reproduce the clean metrics through the attack's own path), against an FGSM computed
here by hand, and for reproducibility; a wrong modality is refused with a message that names the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from ftlab.evaluate import evaluate
from ftlab.runs import rebuild
from ftlab.train import train
from ftlab.utils.errors import ConfigError, DataFileError

from conftest import CONF_DIR, compose_cfg, read_json, tiny_reviews, tiny_text_overrides


def entry_cfg(name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def finished_run(cfg: DictConfig, run_dir: Path) -> Path:
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    train(cfg)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")  # what a Hydra run writes; train() alone does not
    return run_dir


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("robust_image")
    overrides = [
        "data=digits",
        "model=tiny_resnet",
        "model.backbone.input_size=16",
        "trainer.max_epochs=2",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        f"paths.cache_dir={tmp}/cache",
        "callbacks.progress_bar.kind=log",
    ]
    return finished_run(entry_cfg("train", overrides), tmp / "run")


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("robust_text")
    csv = tmp / "reviews.csv"
    tiny_reviews().to_csv(csv, index=False)
    cfg = compose_cfg(tiny_text_overrides(csv, tmp) + ["trainer.max_epochs=3"])
    return finished_run(cfg, tmp / "run")


def attack(run: Path, name: str, *overrides: str) -> dict:
    return evaluate(entry_cfg("eval", [f"run={run}", f"attack={name}", *overrides]))


def test_image_pgd_never_beats_clean_breaks_the_model_at_large_epsilon_and_writes_its_record(image_run):
    metrics = attack(image_run, "pgd", "attack.epsilon=[0,0.02,0.5]")
    recorded = read_json(image_run / "metrics.json")
    clean = metrics["test/acc"]
    assert (
        clean == pytest.approx(recorded["test/acc"], abs=1e-6) and clean > 0.5
    )  # the model learned something
    # ε = 0 goes through the attack's own path (a zero perturbation at the pixel site): the clean numbers
    assert metrics["pgd@0/test/acc"] == pytest.approx(clean, abs=1e-6)
    assert metrics["pgd@0/test/loss"] == pytest.approx(metrics["test/loss"], abs=1e-5)
    assert metrics["pgd@0.02/test/acc"] <= clean
    assert metrics["pgd@0.02/test/loss"] > metrics["test/loss"]
    assert metrics["pgd@0.5/test/acc"] < 0.2 < clean  # half the pixel range: the tiny model is broken
    written = read_json(image_run / "eval" / "test_attack_pgd" / "metrics.json")
    assert written == metrics
    assert written["epsilon"] == [0.0, 0.02, 0.5] and written["steps"] == 10 and written["examples"] > 100


def test_image_pgd_is_reproducible_with_its_seed(image_run, tmp_path):
    args = ("attack.epsilon=[0.03]", "attack.steps=3", f"output_dir={tmp_path}")
    first = attack(image_run, "pgd", *args, "attack.seed=7")
    again = attack(image_run, "pgd", *args, "attack.seed=7")
    other = attack(image_run, "pgd", *args, "attack.seed=8")
    assert first["pgd@0.03/test/loss"] == again["pgd@0.03/test/loss"]
    assert first["pgd@0.03/test/acc"] == again["pgd@0.03/test/acc"]
    assert other["pgd@0.03/test/loss"] != first["pgd@0.03/test/loss"]  # the seed sets the random starts
    assert (tmp_path / "metrics.json").is_file()


def test_image_fgsm_matches_fgsm_computed_by_hand(image_run, tmp_path):
    eps = 0.05
    metrics = attack(image_run, "fgsm", f"attack.epsilon=[{eps}]", f"output_dir={tmp_path}")
    run = rebuild.load_run(image_run)
    pre = run.module.backbone.preprocessing
    mean = torch.tensor(pre.mean).view(1, -1, 1, 1)
    std = torch.tensor(pre.std).view(1, -1, 1, 1)
    correct = total = 0
    for batch in rebuild.datamodule_for(run).test_dataloader():
        image = (batch["pixel_values"] * std + mean).requires_grad_(True)  # the [0, 1] image
        loss = torch.nn.functional.cross_entropy(
            run.module({"pixel_values": (image - mean) / std}), batch["labels"]
        )
        (grad,) = torch.autograd.grad(loss, image)
        adversarial = (image + eps * grad.sign()).clamp(0, 1).detach()
        with torch.no_grad():
            logits = run.module({"pixel_values": (adversarial - mean) / std})
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
        total += len(batch["labels"])
    assert metrics["fgsm@0.05/test/acc"] == pytest.approx(correct / total, abs=1e-6)
    assert metrics["fgsm@0.05/test/acc"] < metrics["test/acc"]


def test_text_char_noise_rate_zero_is_clean_and_noise_changes_the_texts(text_run, tmp_path):
    metrics = attack(text_run, "char_noise", "attack.rate=[0,0.3]", f"output_dir={tmp_path}")
    # rate 0: the raw texts encoded again through the data module's encode(): exactly the loader's batches
    assert metrics["char_noise@0/test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert metrics["char_noise@0/test/loss"] == pytest.approx(metrics["test/loss"], abs=1e-5)
    assert metrics["char_noise@0.3/test/loss"] != pytest.approx(metrics["test/loss"], abs=1e-5)
    again = attack(text_run, "char_noise", "attack.rate=[0,0.3]", f"output_dir={tmp_path}")
    assert again["char_noise@0.3/test/loss"] == metrics["char_noise@0.3/test/loss"]
    assert read_json(tmp_path / "metrics.json")["char_ops"] == ["swap", "insert", "delete", "keyboard"]


def test_text_perturbations_are_seeded_per_example():
    from ftlab.robustness import TextPerturbation

    texts = ["a wonderful, moving film", "boring and far too long"] * 3
    noise = TextPerturbation([0.3], op="char_noise", seed=1)
    first = noise.perturbed(texts, 0.3, 0)
    assert first == noise.perturbed(texts, 0.3, 0)
    assert first != TextPerturbation([0.3], op="char_noise", seed=2).perturbed(texts, 0.3, 0)
    assert first[0] != first[2]  # each example its own stream, not one shared draw
    assert noise.perturbed(texts, 0.0, 0) == texts
    dropped = TextPerturbation([0.5], op="word_deletion").perturbed(texts, 0.5, 0)
    assert all(set(d.split()) <= set(t.split()) for d, t in zip(dropped, texts, strict=True))
    assert dropped != texts


def test_text_embedding_pgd_zero_is_clean_and_large_epsilon_hurts(text_run, tmp_path):
    metrics = attack(
        text_run, "embedding_pgd", "attack.epsilon=[0,20]", "attack.steps=3", f"output_dir={tmp_path}"
    )
    assert metrics["embedding_pgd@0/test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert metrics["embedding_pgd@0/test/loss"] == pytest.approx(metrics["test/loss"], abs=1e-5)
    assert metrics["embedding_pgd@20/test/acc"] <= metrics["test/acc"]
    assert metrics["embedding_pgd@20/test/loss"] > metrics["test/loss"]


def test_wrong_modality_is_a_clear_error_and_writes_nothing(image_run, text_run):
    with pytest.raises(
        ConfigError, match=r"attack=pgd perturbs pixels, but this run's data is text.*embedding_pgd"
    ):
        attack(text_run, "pgd")
    with pytest.raises(ConfigError, match=r"attack=char_noise edits raw texts.*attack=fgsm or attack=pgd"):
        attack(image_run, "char_noise")
    with pytest.raises(ConfigError, match=r"attack.rate=\[0.1, 2.0\]: every value must be at most 1.0"):
        attack(text_run, "word_deletion", "attack.rate=[0.1,2.0]")
    assert not (text_run / "eval" / "test_attack_pgd").exists()
    assert not (image_run / "eval" / "test_attack_char_noise").exists()


def test_sweep_table_puts_attacked_accuracy_beside_clean_with_mean_and_std_over_seeds(tmp_path):
    from ftlab.robustness.table import robustness_table

    sweep = tmp_path / "sweep"
    records = {  # (adversarial, seed): (clean acc, pgd@0.1 acc); one job has no attack record yet
        ("none", 1): (0.90, 0.10),
        ("none", 2): (0.80, 0.30),
        ("pgd", 1): (0.85, 0.60),
        ("pgd", 2): (0.75, None),
    }
    for i, ((method, seed), (clean, attacked)) in enumerate(records.items()):
        job = sweep / str(i)
        job.mkdir(parents=True)
        overrides = [f"adversarial={method}", f"seed={seed}"]
        (job / "metrics.json").write_text(json.dumps({"test/acc": clean, "overrides": overrides}))
        if attacked is not None:
            (job / "eval" / "test_attack_pgd").mkdir(parents=True)
            record = {
                "test/acc": clean,
                "pgd@0.1/test/acc": attacked,
                "pgd@0.1/test/loss": 2.0,
                "attack": "pgd",
            }
            (job / "eval" / "test_attack_pgd" / "metrics.json").write_text(json.dumps(record))
    result = robustness_table([sweep])
    table = result["table"].set_index("adversarial")
    assert table.loc["none", "pgd@0.1/test/acc mean"] == pytest.approx(0.20)
    assert table.loc["none", "pgd@0.1/test/acc std"] == pytest.approx(0.1414, abs=1e-4)
    assert table.loc["none", "test/acc mean"] == pytest.approx(0.85)
    assert table.loc["pgd", "pgd@0.1/test/acc mean"] == pytest.approx(
        0.60
    )  # the job without a record: not a 0
    assert table.loc["pgd", "test/acc mean"] == pytest.approx(0.80)
    assert "pgd@0.1/test/loss" not in result["markdown"] and "0.2000 ± 0.1414" in result["markdown"]
    assert (sweep / "robustness.md").read_text() == result["markdown"] and (
        sweep / "robustness.csv"
    ).is_file()
    with pytest.raises(DataFileError, match="ftlab-eval run=<job> attack=<name>"):
        robustness_table([sweep], split="validation")


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "attack").glob("*.yaml")))
def test_every_attack_config_composes_with_eval_and_builds_its_attack(name):
    from ftlab.checks import check_config
    from ftlab.robustness.evaluation import build_attack

    cfg = entry_cfg("eval", ["run=/some/run", f"attack={name}"])
    check_config(cfg, "eval")  # every key is an argument of its target
    built = build_attack(cfg.attack)
    assert built.name == name and built.values and all(v > 0 for v in built.values)


@pytest.mark.parametrize(
    ("name", "swept"),
    [
        ("adversarial_text", {"seed"}),
        ("adversarial_image", {"seed"}),
        ("weight_averaging", {"seed", "callbacks"}),
    ],
)
def test_robustness_experiments_compose_and_their_scripts_run_them(name, swept):
    import os

    for variant in (name, f"{name}_full"):
        cfg = entry_cfg("train", [f"experiment={variant}"])
        assert (
            cfg.name == variant and cfg.get("adversarial") is None
        )  # the adversarial rows come from the script
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            params = compose(
                "train", [f"experiment={variant}"], return_hydra_config=True
            ).hydra.sweeper.params
        assert set(params) == swept and len(str(params["seed"]).split(",")) >= 3
        if variant != name:  # one override away, on a GPU, with all the data
            assert cfg.trainer.accelerator == "gpu" and cfg.data.get("max_train_examples") is None
    script = CONF_DIR.parent / "scripts" / f"reproduce_{name}.sh"
    assert os.access(script, os.X_OK) and f"experiment={name}" in script.read_text()
    assert f"scripts/reproduce_{name}.sh" in (CONF_DIR.parent / "docs" / "robustness.md").read_text()


def test_multilabel_run_is_attacked_through_its_own_loss_and_metrics(tmp_path):
    from test_multilabel import tiny_genres

    tiny_genres(120).to_csv(tmp_path / "genres.csv", index=False)
    overrides = tiny_text_overrides(tmp_path / "genres.csv", tmp_path) + [
        "data.text_column=text",
        "data.label_column=genres",
        "data.task=multilabel",
        "trainer.max_epochs=2",
        "monitor=val/f1_micro",
    ]
    run = finished_run(compose_cfg(overrides), tmp_path / "run")
    noise = attack(run, "char_noise", "attack.rate=[0,0.5]")
    pgd = attack(run, "embedding_pgd", "attack.epsilon=[0,20]", "attack.steps=2")
    for metrics, name in ((noise, "char_noise"), (pgd, "embedding_pgd")):
        clean = {k: v for k, v in metrics.items() if k.startswith("test/")}
        assert "test/f1_micro" in clean
        assert {k: metrics[f"{name}@0/{k}"] for k in clean} == pytest.approx(clean, abs=1e-5)
    assert pgd["embedding_pgd@20/test/loss"] > pgd["test/loss"]  # BCE, the multi-label task's loss, went up
    assert noise["char_noise@0.5/test/loss"] != pytest.approx(noise["test/loss"], abs=1e-5)
