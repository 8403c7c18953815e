"""A checkpoint whose unpickling would run code is refused wherever ftlab reads one, before any of it runs.

The payload is real: unpickled the unsafe way (``weights_only=False``) it writes a marker file (checked below).
ftlab reads every checkpoint through ``ftlab.runs.folder.read_checkpoint`` (``torch.load(weights_only=True)``);
these tests go through the entry points a user calls: a backbone transfer (``model.backbone.checkpoint=``) in
``ftlab-train``, and ``ftlab-eval`` / ``ftlab-predict`` / ``ftlab-export`` on a run folder whose ``best.ckpt`` is
such a file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ftlab.train import train
from ftlab.utils.errors import ModelLoadError

from conftest import compose_cfg, run_cli, tiny_text_overrides


class Payload:
    """Pickled as a call of ``exec``: unpickling it runs code that writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


def write_payload_checkpoint(path: Path, marker: Path) -> Path:
    """A Lightning-shaped checkpoint (state dict, hyper-parameters) carrying the payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {"state_dict": {"backbone.weight": torch.zeros(2)}, "hyper_parameters": {"num_classes": 2}}
    torch.save({**checkpoint, "callbacks": Payload(marker)}, path)
    return path


def test_the_payload_runs_code_when_unpickled_unsafely(tmp_path):
    """The control: without weights_only the file does run its code, so the tests below could fail."""
    path = write_payload_checkpoint(tmp_path / "evil.ckpt", tmp_path / "marker")
    torch.load(path, weights_only=False)
    assert (tmp_path / "marker").read_text() == "code ran"


def image_overrides(tmp_path: Path, checkpoint: Path) -> list[str]:
    return [
        "data=digits",
        "model=tiny_resnet",
        "model.backbone.input_size=16",
        "debug=fdr",
        f"model.backbone.checkpoint={checkpoint}",
        f"paths.cache_dir={tmp_path}/cache",
        "callbacks.progress_bar.kind=log",
    ]


@pytest.mark.parametrize("where", ["ckpt file", "run folder"])
def test_a_backbone_checkpoint_with_a_payload_is_refused(tmp_path, where):
    marker = tmp_path / "marker"
    if where == "ckpt file":
        checkpoint = write_payload_checkpoint(tmp_path / "evil.ckpt", marker)
        given = checkpoint
    else:  # a run folder: its backbone.pt is what transfer reads
        checkpoint = write_payload_checkpoint(tmp_path / "source" / "backbone.pt", marker)
        given = tmp_path / "source"
    with pytest.raises(ModelLoadError, match=r"weights_only=True") as err:
        train(compose_cfg(image_overrides(tmp_path, given), tmp_path / "run"))
    assert str(checkpoint) in str(err.value)
    assert not marker.exists() and not (tmp_path / "run" / "metrics.json").exists()


def test_train_cli_refuses_a_backbone_checkpoint_with_a_payload(tmp_path):
    marker = tmp_path / "marker"
    checkpoint = write_payload_checkpoint(tmp_path / "evil.ckpt", marker)
    proc = run_cli(
        "train", [*image_overrides(tmp_path, checkpoint), f"paths.log_dir={tmp_path}/out"], cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "weights_only=True" in proc.stderr and str(checkpoint) in proc.stderr
    assert "Traceback" not in proc.stderr and not marker.exists()


@pytest.fixture
def payload_run(tmp_path, reviews_csv) -> tuple[Path, Path]:
    """A run folder (a tiny_bert config, as a Hydra run saves it) whose best.ckpt carries the payload."""
    run = tmp_path / "run"
    cfg = compose_cfg(tiny_text_overrides(reviews_csv, tmp_path), run)
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    marker = tmp_path / "marker"
    write_payload_checkpoint(run / "checkpoints" / "best.ckpt", marker)
    return run, marker


@pytest.mark.parametrize(
    ("entry", "args"),
    [("evaluate", []), ("predict", ['inputs=["a wonderful film"]']), ("export", ["format=onnx"])],
)
def test_eval_predict_export_refuse_a_run_checkpoint_with_a_payload(payload_run, tmp_path, entry, args):
    run, marker = payload_run
    proc = run_cli(entry, [f"run={run}", *args], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "weights_only=True" in proc.stderr and str(run / "checkpoints" / "best.ckpt") in proc.stderr
    assert "Traceback" not in proc.stderr and not marker.exists()
    assert sorted(p.name for p in run.iterdir()) == [".hydra", "checkpoints"]  # nothing written
