"""FSDP (trainer=fsdp_cpu: Lightning's FSDP on 2 CPU processes with gloo, ftlab.finetuning.sharding): the run record
matches a single-process run, sharded checkpoints are read weights-only by ftlab-eval/predict/export and resume,
frozen parameters never move, LoRA's metrics match the single-process run."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ftlab.export import export
from ftlab.predict import predict
from ftlab.runs import folder
from ftlab.utils.errors import ConfigError, ModelLoadError

from conftest import CONF_DIR, compose_cfg, read_json, run_cli, tiny_reviews, tiny_text_overrides


def _train(tmp_path: Path, name: str, *extra: str) -> tuple[Path, str]:
    run_dir = tmp_path / name
    csv_path = tmp_path / "reviews.csv"
    if not csv_path.exists():
        tiny_reviews().to_csv(csv_path, index=False)
    args = [
        *(o for o in tiny_text_overrides(csv_path, tmp_path) if not o.startswith("trainer.devices")),
        "scheduler=constant",
        "trainer.log_every_n_steps=2",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    done = run_cli("train", args, cwd=tmp_path, timeout=900)  # two ranks: minutes on a loaded machine
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, done.stdout + done.stderr


def _csv(run_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    with (run_dir / "csv" / "metrics.csv").open() as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return folder.read_checkpoint(path)["state_dict"]


def _initial_backbone() -> dict[str, torch.Tensor]:
    """tiny_bert's weights as train() builds them (random init right after seeding with seed=42)."""
    cfg = compose_cfg(["model=tiny_bert"])
    pl.seed_everything(cfg.seed, workers=True)
    return {f"backbone.{k}": v for k, v in instantiate(cfg.model.backbone).state_dict().items()}


def test_sharded_checkpoint_with_pickled_code_is_refused(tmp_path):
    ckpt = tmp_path / "best.ckpt"
    ckpt.mkdir()
    torch.save({"epoch": 0}, ckpt / "meta.pt")
    (ckpt / ".metadata").write_bytes(pickle.dumps(print))  # any global outside the checkpoint's dataclasses
    with pytest.raises(ModelLoadError, match="weights_only=True refuses to run pickled code"):
        folder.read_checkpoint(ckpt)
    (ckpt / ".metadata").unlink()
    with pytest.raises(ModelLoadError, match="not a sharded FSDP checkpoint"):
        folder.read_checkpoint(ckpt)


def test_fsdp_inside_a_multirun_on_one_machine_fails_clearly(monkeypatch):
    from lightning_fabric.plugins.environments import LightningEnvironment, SLURMEnvironment

    from ftlab.finetuning.sharding import LayerGroupFSDPStrategy
    from ftlab.runs import jobs

    monkeypatch.setattr(jobs, "is_multirun", lambda: True)
    strategy = LayerGroupFSDPStrategy(cluster_environment=LightningEnvironment())
    with pytest.raises(ConfigError, match="multirun.*re-runs the script once per rank"):
        strategy._configure_launcher()
    # ranks started by SLURM (hydra/launcher=slurm) do not re-run the script: allowed
    LayerGroupFSDPStrategy(cluster_environment=SLURMEnvironment())._configure_launcher()


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def _close(cell: str, other: str) -> bool:
    return cell == other or (
        bool(cell) and bool(other) and float(cell) == pytest.approx(float(other), abs=1e-4)
    )


# Full-batch steps (64 training texts: one batch of 64, or 32 on each of 2 ranks) and no dropout: FSDP computes the
# same gradient as one process (the mean over the same examples), so the runs must agree to float precision.
EXACT = [
    "model.head.dropout=0",
    "+model.backbone.config_overrides.hidden_dropout_prob=0",
    "+model.backbone.config_overrides.attention_probs_dropout_prob=0",
]
ONE, TWO = ["trainer.devices=1", "data.batch_size=64"], ["trainer=fsdp_cpu", "data.batch_size=32"]


@pytest.mark.slow
def test_fsdp_lora_run_resumes_matches_one_process_and_is_read_by_eval_predict_export(tmp_path):
    lora = [*EXACT, "finetune=lora", "finetune.peft.dropout=0", "optimizer.lr=1e-3"]
    single, _ = _train(tmp_path, "single", *lora, *ONE, "trainer.max_epochs=4")
    # FSDP for 2 of the 4 epochs, then resume=<run> from its sharded last.ckpt (weights, optimizer, position)
    fsdp, output = _train(tmp_path, "fsdp", *lora, *TWO, "trainer.max_epochs=2")
    assert (fsdp / folder.LAST_CKPT).is_dir() and len(list((fsdp / folder.LAST_CKPT).glob("*.distcp"))) == 2
    _, more = _train(tmp_path, "fsdp", *lora, *TWO, "trainer.max_epochs=4", f"resume={fsdp}")
    assert "sync_dist" not in output + more
    assert "BertEmbeddings x1, BertLayer x2" in (fsdp / "train.log").read_text()  # units: the layer groups

    # the same record as one process: keys, CSV columns (every optimizer group's lr) and every logged value
    one, two = read_json(single / "metrics.json"), read_json(fsdp / "metrics.json")
    assert list(one) == list(two)
    for key in ("test/acc", "test/loss", "test/f1", "best/val/acc", "best_epoch", "trainable_params"):
        assert two[key] == pytest.approx(one[key], abs=1e-4), key
    (columns, rows), (columns_one, rows_one) = _csv(fsdp), _csv(single)
    first_test = [r for r in rows if r["test/acc"]][0]
    assert first_test["epoch"] == "2"  # the first part tested its best checkpoint too; the rest is one run
    rows.remove(first_test)
    assert columns == columns_one and len(rows) == len(rows_one)
    for row, row_one in zip(rows, rows_one, strict=True):
        assert all(_close(row[c], row_one[c]) for c in columns), (row, row_one)
    losses = [float(r["train/loss_epoch"]) for r in rows if r["train/loss_epoch"]]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.02  # it trained, through the resume
    status = read_json(fsdp / "status.json")
    assert status["status"] == "completed" and status["objective"] == pytest.approx(two["best/val/acc"])

    # best.ckpt is a folder of shards; consolidated weights-only it has the single run's keys; LoRA's frozen base
    # weights are bit-identical to the single run's (never updated), the adapters match it
    sharded, plain = _weights(fsdp / folder.BEST_CKPT), _weights(single / folder.BEST_CKPT)
    assert sorted(sharded) == sorted(plain)
    frozen = [k for k in sharded if k.startswith("backbone.") and "lora_" not in k]
    assert frozen and all(torch.equal(sharded[k], plain[k]) for k in frozen)
    adapters = [k for k in sharded if "lora_B" in k]  # lora_B starts at zero
    assert adapters and all(sharded[k].abs().sum() > 0 for k in adapters)
    assert all(torch.allclose(sharded[k], plain[k], atol=1e-4) for k in adapters)

    # ftlab-eval scores the consolidated checkpoint in one process: the metrics FSDP's test stage logged
    done = run_cli("evaluate", [f"run={fsdp}", "split=test"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    scored = read_json(fsdp / "eval" / "test" / "metrics.json")
    for key in ("test/acc", "test/loss"):
        assert scored[key] == pytest.approx(two[key], abs=1e-5), key
    # ftlab-predict and ftlab-export (in-process; their CLIs are tested elsewhere) read it too
    written = predict(_compose("predict", [f"run={fsdp}", 'inputs=["a wonderful film","a dull mess"]']))
    assert written["examples"] == 2 and Path(written["output"]).is_file()
    exported = export(_compose("export", [f"run={fsdp}", "format=onnx", f"output_dir={tmp_path / 'onnx'}"]))
    assert exported["checkpoint"] == str(fsdp / folder.BEST_CKPT)
    assert exported["same_labels"] and exported["max_abs_diff"] <= 1e-4  # ONNX logits vs the checkpoint's


@pytest.mark.slow
def test_fsdp_gradual_unfreezing_keeps_frozen_groups_and_matches_one_process(tmp_path):
    gradual = [*EXACT, "trainer.max_epochs=3", "finetune=gradual_unfreeze", "optimizer.lr=5e-3"]
    single, _ = _train(tmp_path, "single", *gradual, *ONE)
    fsdp, _ = _train(tmp_path, "fsdp", *gradual, *TWO)
    initial = _initial_backbone()
    weights = _weights(fsdp / folder.LAST_CKPT)
    groups = {"embeddings": ".embeddings.", "layer.0": ".layer.0.", "layer.1": ".layer.1."}
    moved = {
        name: any(not torch.equal(w, initial[k]) for k, w in weights.items() if part in k)
        for name, part in groups.items()
    }
    # epoch 0 trains the head, epoch 1 also layer.1, epoch 2 also layer.0; the embeddings kept requires_grad
    # under FSDP (they unfreeze at epoch 3) but their gradients were dropped: bit-identical to the initial weights
    assert moved == {"embeddings": False, "layer.0": True, "layer.1": True}
    plain = _weights(single / folder.LAST_CKPT)
    assert all(torch.allclose(weights[k], plain[k], atol=1e-4) for k in plain), "FSDP and one process differ"
    one, two = read_json(single / "metrics.json"), read_json(fsdp / "metrics.json")
    assert two["test/loss"] == pytest.approx(one["test/loss"], abs=1e-4)
