"""``hparams_search=optuna`` on current Optuna: search space, samplers and pruners, a study shared by processes,
a search resumed after its process died, and a hopeless trial pruned at its first validation.

The storage tests run a toy Hydra app (no torch: about a second per process) with ftlab's sweeper plugin; the
pruning test runs ``ftlab-train -m`` with the tiny BERT.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import pytorch_lightning as pl
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from pytorch_lightning.demos.boring_classes import BoringModel

import ftlab.runs.jobs  # noqa: F401 - the ${ftlab.*} resolvers and the sweeper's configs, as ftlab-train has them
from ftlab import cli, report
from ftlab.search import space
from ftlab.search.pruning import OptunaPruning, Pruned
from ftlab.search.study import INTERRUPTED, JOB_FAILED, RETRY_OF, open_storage
from ftlab.utils.errors import ConfigError

from conftest import CONF_DIR

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {
    **os.environ,
    "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    "HYDRA_FULL_ERROR": "1",
}

# A toy objective, (x - 2)^2: each job may wait for the other process (so both take part), or kill its own process.
APP = """
import os, signal, sys, time
from pathlib import Path

import hydra

from ftlab.search import register_sweeper

register_sweeper()


# Ctrl-C as from a shell: a process started by a test worker can inherit an ignored SIGINT (Lightning ignores it
# once a fit saw a KeyboardInterrupt), and then the SIGINT below would do nothing
signal.signal(signal.SIGINT, signal.default_int_handler)


@hydra.main(version_base="1.3", config_path=".", config_name="search")
def main(cfg):
    trial = int(os.environ["FTLAB_OPTUNA_TRIAL"])
    if cfg.die_at == trial:
        os.kill(os.getpid(), getattr(signal, cfg.signal))
        time.sleep(5)
    if cfg.barrier:  # until two processes have each started a job
        Path(cfg.barrier, str(os.getpid())).touch()
        deadline = time.time() + 60
        while len(list(Path(cfg.barrier).iterdir())) < 2 and time.time() < deadline:
            time.sleep(0.05)
    time.sleep(cfg.sleep)
    return (cfg.x - 2.0) ** 2


main()
"""
SEARCH = """
defaults:
  - override hydra/sweeper: ftlab_optuna
  - _self_
x: 0.0
sleep: 0.2
barrier: null
die_at: null
signal: SIGKILL
hydra:
  sweeper:
    study_name: toy
    heartbeat_interval: 0.2
    params:
      x: interval(-5.0, 5.0)
"""


@pytest.fixture
def toy(tmp_path):
    app = tmp_path / "app"  # its own folder: Hydra reads the folders beside search.yaml as config groups
    app.mkdir()
    (app / "app.py").write_text(APP)
    (app / "search.yaml").write_text(SEARCH)

    def start(*overrides: str) -> subprocess.Popen:
        cmd = [sys.executable, str(app / "app.py"), "-m", *overrides]
        return subprocess.Popen(
            cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    return start


def _finish(proc: subprocess.Popen, ok: bool = True) -> str:
    out, _ = proc.communicate(timeout=180)
    assert (proc.returncode == 0) == ok, out[-4000:]
    return out


def _jobs(sweep: Path) -> set[int]:
    return {int(p.name) for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()}


def test_search_space_reads_the_hydra_sweep_syntax():
    searched, fixed = space.parse(
        ["optimizer.lr=tag(log, interval(1e-5, 1e-3))", "optimizer.weight_decay=interval(0.0, 0.1)",
         "data.batch_size=choice(16,32)", "finetune.k=range(1,5)", "trainer.max_epochs=range(1.0,2.0,0.5)",
         "seed=3", "model.head.dropout=interval(0.1, 0.5)", "model.head.dropout=0.2"]
    )  # fmt: skip
    assert searched["optimizer.lr"] == FloatDistribution(1e-5, 1e-3, log=True)
    assert searched["optimizer.weight_decay"] == FloatDistribution(0.0, 0.1)
    assert searched["data.batch_size"] == CategoricalDistribution([16, 32])
    assert searched["finetune.k"] == IntDistribution(1, 4)  # Hydra's range ends before its stop
    assert searched["trainer.max_epochs"] == FloatDistribution(1.0, 1.5, step=0.5)
    assert fixed == {"seed": "3", "model.head.dropout": "0.2"} and "model.head.dropout" not in searched
    assert space.grid({k: searched[k] for k in ("data.batch_size", "finetune.k")}) == {
        "data.batch_size": [16, 32], "finetune.k": [1, 2, 3, 4]}  # fmt: skip
    with pytest.raises(ConfigError, match=r"sampler=grid needs discrete values.*optimizer\.lr.*choice"):
        space.grid(searched)


@pytest.mark.parametrize(
    ("sampler", "pruner"), [("tpe", "median"), ("random", "asha"), ("cmaes", "hyperband"), ("grid", "none")]
)
def test_each_sampler_and_pruner_composes_with_the_shipped_search(sampler, pruner):
    overrides = ["model=tiny_bert", "hparams_search=optuna", f"hydra/sweeper/sampler={sampler}",
                 f"hydra/sweeper/pruner={pruner}"]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        sweeper = compose("train", overrides=overrides, return_hydra_config=True).hydra.sweeper
    assert sweeper._target_.endswith("FtlabOptunaSweeper") and sweeper.direction == "maximize"
    built = instantiate(sweeper.sampler)
    if sampler == "grid":  # completed with the grid when the sweep starts
        built = built(search_space={"optimizer.lr": [1e-4, 1e-3]})
    names = {"tpe": "TPESampler", "random": "RandomSampler", "cmaes": "CmaEsSampler", "grid": "GridSampler"}
    assert type(built).__name__ == names[sampler] and sweeper.sampler.seed == 42  # seeded by ${seed}
    pruners = {"median": "MedianPruner", "asha": "SuccessiveHalvingPruner", "hyperband": "HyperbandPruner",
               "none": "NopPruner"}  # fmt: skip
    assert type(instantiate(sweeper.pruner)).__name__ == pruners[pruner]


def test_two_processes_share_one_study_and_its_trial_budget(toy, tmp_path):
    (tmp_path / "barrier").mkdir()
    common = ["hydra.sweeper.storage=journal://study.log", "hydra.sweeper.n_trials=7", "barrier=barrier"]
    first = toy(*common, "hydra.sweep.dir=a", "hydra.sweeper.sampler.seed=1")
    second = toy(*common, "hydra.sweep.dir=b", "hydra.sweeper.sampler.seed=2", "hydra.sweeper.n_jobs=2")
    _finish(first), _finish(second)
    a, b = _jobs(tmp_path / "a"), _jobs(tmp_path / "b")
    assert a and b and not a & b and a | b == set(range(7))  # both worked; job folders named by trial number
    study = optuna.load_study(study_name="toy", storage=open_storage(f"journal://{tmp_path / 'study.log'}"))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 7  # 7 in all, not 7 each
    best = min(study.trials, key=lambda t: t.value)
    results = [yaml.safe_load((tmp_path / d / "optimization_results.yaml").read_text()) for d in ("a", "b")]
    # the first to stop saw the other's last trial running; the last saw all 7 complete, and the study's best
    assert all(sum(r["trials"].values()) == 7 for r in results)
    last = next(r for r in results if r["trials"] == {"complete": 7})
    assert last["best_value"] == pytest.approx(best.value) and last["best_trial"] == best.number


@pytest.mark.parametrize(
    ("signal", "url"), [("SIGINT", "sqlite:///study.db"), ("SIGKILL", "journal://study.log")]
)
def test_a_search_whose_process_died_resumes_where_it_stopped(toy, tmp_path, signal, url):
    """SIGINT (Ctrl-C): the sweeper marks its running trial interrupted. SIGKILL (a lost machine): the trial
    stops beating, and the next process fails it after the grace period. Neither counts toward n_trials, and its
    values are the next to run."""
    common = [f"hydra.sweeper.storage={url}", "hydra.sweeper.n_trials=4", "hydra.sweeper.grace_period=1"]
    _finish(toy(*common, "hydra.sweep.dir=first", "die_at=2", f"signal={signal}"), ok=False)
    storage = open_storage(
        url.replace("///", f"///{tmp_path}/") if "sqlite" in url else f"journal://{tmp_path}/study.log"
    )
    before = optuna.load_study(study_name="toy", storage=storage).trials
    cut = {"SIGINT": [TrialState.FAIL, TrialState.WAITING], "SIGKILL": [TrialState.RUNNING]}[signal]
    assert [t.state for t in before] == [
        TrialState.COMPLETE,
        TrialState.COMPLETE,
        *cut,
    ]  # SIGINT: queued again
    time.sleep(1.5)  # past the grace period: the killed trial's last heartbeat must be older than 1 s
    out = _finish(toy(*common, "hydra.sweep.dir=second"))
    assert _jobs(tmp_path / "second") == {3, 4}  # trials 0 and 1 are not run again; the budget is 4 in all
    trials = optuna.load_study(study_name="toy", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL] + [
        TrialState.COMPLETE
    ] * 2
    assert [t.params for t in trials[:2]] == [t.params for t in before[:2]]
    lost = trials[2]
    assert not lost.user_attrs.get(JOB_FAILED)  # not the job's fault: not counted
    assert (
        trials[3].params == lost.params and trials[3].user_attrs[RETRY_OF] == 2
    )  # its values ran again first
    if signal == "SIGINT":
        assert lost.user_attrs[INTERRUPTED] == "KeyboardInterrupt"
    else:
        assert "trials [2] had no heartbeat" in out


def test_a_hopeless_trial_is_pruned_at_its_first_validation(tmp_path):
    """Two trials queued in a journal study: lr=1e-3, then lr=100 (AdamW diverges). The median pruner (after one
    completed trial) stops the second at its first validation: one epoch of three, recorded as pruned."""
    url = f"journal://{tmp_path / 'study.log'}"
    study = optuna.create_study(study_name="prune", storage=open_storage(url), direction="minimize")
    study.enqueue_trial({"optimizer.lr": 1e-3})
    study.enqueue_trial({"optimizer.lr": 100.0})
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "ftlab.train", "-m", "model=tiny_bert", "debug=limit", "data.max_train_examples=64",
           "data.batch_size=16", "trainer.max_epochs=3", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
           "trainer.limit_test_batches=1", "trainer.num_sanity_val_steps=0", f"paths.log_dir={tmp_path}",
           f"paths.cache_dir={tmp_path / 'cache'}", "monitor=val/loss", "monitor_mode=min", "hparams_search=optuna",
           f"hparams_search.storage={url}", "hydra.sweeper.study_name=prune", "hydra.sweeper.n_trials=2",
           "hydra.sweeper.pruner.n_startup_trials=1", "optimizer.lr=choice(0.001,100.0)", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    good, bad = (
        json.loads((sweep / "0" / "status.json").read_text()),
        json.loads((sweep / "1" / "status.json").read_text()),
    )
    assert good["status"] == "completed" and (sweep / "0" / "metrics.json").is_file()
    assert bad["status"] == "pruned" and (bad["trial"], bad["step"], bad["epoch"]) == (1, 1, 0)
    assert not (sweep / "1" / "metrics.json").exists()  # stopped at once: no further epoch, no test
    validated = {}  # the epochs with a validation row in each job's CSV log
    for name in ("0", "1"):
        rows = pd.read_csv(sweep / name / "csv" / "metrics.csv").dropna(subset=["val/loss"])
        validated[name] = sorted(set(rows["epoch"]))
    assert validated == {"0": [0, 1, 2], "1": [0]}
    trials = optuna.load_study(study_name="prune", storage=open_storage(url)).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert sorted(trials[0].intermediate_values) == [1, 2, 3]  # every validation reported
    assert trials[1].intermediate_values == {1: pytest.approx(bad["value"])} and bad["value"] > max(
        trials[0].intermediate_values.values()
    )
    md = report.report([sweep])["markdown"]
    assert (
        "Pruned by the Optuna search (1 trials):" in md and "trial 1 stopped at validation 1 (epoch 0)" in md
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "hydra/sweeper/sampler=grid",
            "sampler=grid needs discrete values, but hydra.sweeper.params.optimizer.lr",
        ),
        ("hydra.sweeper.direction=max", "hydra.sweeper.direction='max' must be 'minimize' or 'maximize'"),
    ],
)
def test_a_bad_search_setting_stops_ftlab_train_before_anything_runs(
    monkeypatch, capsys, tmp_path, override, message
):
    argv = [
        "ftlab-train",
        "-m",
        "model=tiny_bert",
        "hparams_search=optuna",
        override,
        f"paths.log_dir={tmp_path}",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        cli.train()
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("ftlab: error: ") and message in err
    assert not any(tmp_path.iterdir())  # no sweep folder


class _LoggedLoss(BoringModel):
    def validation_step(self, batch, batch_idx):
        loss = self.step(batch)
        self.log("val/loss", loss)
        return loss


def _trainer(callback: OptunaPruning, tmp_path: Path) -> pl.Trainer:
    """Two epochs of 4 steps, validated every 2 steps."""
    return pl.Trainer(max_epochs=2, limit_train_batches=4, limit_val_batches=1, val_check_interval=0.5,
                      num_sanity_val_steps=0, callbacks=[callback], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip


def test_every_validation_is_reported_and_a_pruned_trial_stops_inside_the_epoch(tmp_path):
    study = optuna.create_study(pruner=optuna.pruners.NopPruner())
    callback = OptunaPruning(study.ask(), "val/loss")
    trainer = _trainer(callback, tmp_path)
    trainer.fit(_LoggedLoss())
    assert sorted(study.trials[0].intermediate_values) == [
        1,
        2,
        3,
        4,
    ]  # two validations per epoch, two epochs
    assert (
        trainer.global_step == 8 and callback.record is None and study.trials[0].state == TrialState.RUNNING
    )

    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=-1.0))  # any loss is above -1
    callback = OptunaPruning(study.ask(), "val/loss")
    trainer = _trainer(callback, tmp_path)
    with pytest.raises(Pruned, match=r"pruned at validation 1 \(epoch 0\): val/loss="):
        trainer.fit(_LoggedLoss())
    assert trainer.global_step == 2  # stopped at the first validation, in the middle of epoch 0
    assert callback.record["global_step"] == 2 and study.trials[0].state == TrialState.PRUNED
