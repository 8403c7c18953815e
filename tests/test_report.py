"""ftlab-report on hand-made sweep folders: grouping, mean/std/n, excluded jobs, the files it writes."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from ftlab import report
from ftlab.utils.errors import ConfigError


def _job(sweep: Path, num: int, overrides: list[str], metrics: dict | None, status: dict | None) -> Path:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None:
        record = {
            "monitor": "val/acc",
            "trainable_params": 1000,
            "wall_time_s": 2.0 + num,
            "overrides": overrides,
        }
        (job / "metrics.json").write_text(json.dumps({**metrics, **record}))
    if status is not None:
        (job / "status.json").write_text(json.dumps(status))
    return job


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A 2 lr x 3 seed sweep: lr=0.1 has 3 completed jobs, lr=0.01 two, one failed, plus one unfinished job."""
    accs = {(0.1, 1): 0.70, (0.1, 2): 0.74, (0.1, 3): 0.81, (0.01, 1): 0.60, (0.01, 2): 0.66}
    num = 0
    for (lr, seed), acc in accs.items():
        metrics = {"test/acc": acc, "test/loss": 1 - acc, "best/val/acc": acc + 0.01}
        over = ["model=tiny_bert", f"optimizer.lr={lr}", f"seed={seed}", f"paths.log_dir=/tmp/x{num}"]
        _job(tmp_path, num, over, metrics, {"status": "completed"})
        num += 1
    _job(
        tmp_path,
        num,
        ["model=tiny_bert", "optimizer.lr=0.01", "seed=3"],
        None,
        {"status": "failed", "error": "loss is NaN", "type": "ValueError"},
    )
    _job(tmp_path, num + 1, ["model=tiny_bert", "optimizer.lr=0.5", "seed=1"], None, None)
    return tmp_path


def test_report_groups_over_seeds_with_sample_std(sweep: Path):
    result = report.report([sweep])
    table = result["table"].set_index("optimizer.lr")
    assert list(table.index) == ["0.01", "0.1"]  # numeric order; the unfinished lr=0.5 has no row
    for lr, accs in {"0.1": [0.70, 0.74, 0.81], "0.01": [0.60, 0.66]}.items():
        assert table.loc[lr, "n"] == len(accs)
        assert table.loc[lr, "test/acc mean"] == pytest.approx(statistics.mean(accs))
        assert table.loc[lr, "test/acc std"] == pytest.approx(statistics.stdev(accs))  # ddof=1
        assert table.loc[lr, "best/val/acc mean"] == pytest.approx(statistics.mean(accs) + 0.01)
    assert table.loc["0.1", "wall_time_s mean"] == pytest.approx(3.0)  # jobs 0-2: 2 + num
    assert set(table.columns) >= {"trainable_params", "test/loss mean", "test/loss std"}
    assert "seed" not in table.columns and "paths.log_dir" not in table.columns


def test_report_writes_files_and_lists_excluded_jobs(sweep: Path, capsys):
    report.main([str(sweep)])
    md = (sweep / "results.md").read_text()
    printed = capsys.readouterr().out
    assert md.splitlines()[0] == printed.splitlines()[0]
    assert "| 0.1 |" in md and "0.7500 ± 0.0557" in md  # mean and sample std of 0.70, 0.74, 0.81
    assert "Excluded (2 failed or unfinished jobs)" in md
    assert "/5: failed (loss is NaN)" in md and "/6: unfinished" in md
    assert "Fixed in every job: model=tiny_bert" in md
    csv = (sweep / "results.csv").read_text().splitlines()
    assert csv[0].startswith("optimizer.lr,n,") and len(csv) == 3
    tex = (sweep / "results.tex").read_text()
    assert r"\begin{tabular}" in tex and r"0.7500 $\pm$ 0.0557" in tex and r"optimizer.lr" in tex
    png = sweep / "plot_optimizer.lr.png"
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_report_chosen_metrics_and_ignored_keys(sweep: Path, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    result = report.report([sweep], metrics=["test/acc"], ignore=(), out=out)
    table = result["table"]
    assert len(table) == 5 and set(table["n"]) == {1}  # seed is now a group key: one job per row
    assert "best/val/acc mean" not in table.columns and table["test/acc std"].isna().all()
    assert (out / "results.md").is_file() and sorted(p.name for p in out.glob("*.png")) == [
        "plot_optimizer.lr.png", "plot_seed.png"]  # fmt: skip
    with pytest.raises(ConfigError, match="test/f1.*Available: best/val/acc, test/acc, test/loss"):
        report.report([sweep], metrics=["test/f1"], out=out)


def test_report_several_sweeps_and_errors(sweep: Path, tmp_path_factory, capsys):
    other = tmp_path_factory.mktemp("other")
    _job(
        other,
        0,
        ["model=tiny_bert", "optimizer.lr=0.1", "seed=4"],
        {"test/acc": 0.9},
        {"status": "completed"},
    )
    table = report.report([sweep, other], plots=False)["table"].set_index("optimizer.lr")
    assert table.loc["0.1", "n"] == 4
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(empty)])
    assert exit_info.value.code == 2 and "no job folders" in capsys.readouterr().err


def test_categorical_sweep_gets_a_bar_plot_of_its_rows(tmp_path: Path):
    """No swept key is numeric (strategies): one bar per row instead of a line plot."""
    accs = {"full": (0.80, 0.82), "head_only": (0.70, 0.72), "lora": (0.78, 0.76)}
    num = 0
    for strategy, values in accs.items():
        for seed, acc in enumerate(values):
            over = [f"finetune={strategy}", f"seed={seed}"]
            _job(tmp_path, num, over, {"test/acc": acc, "best/val/acc": acc}, {"status": "completed"})
            num += 1
    result = report.report([tmp_path])
    assert [p.name for p in result["plots"]] == ["plot_settings.png"]
    assert (tmp_path / "plot_settings.png").read_bytes()[:4] == b"\x89PNG"
    table = result["table"].set_index("finetune")
    assert table.loc["head_only", "test/acc mean"] == pytest.approx(0.71)


def test_rows_without_the_x_key_are_horizontal_lines_on_its_plot(tmp_path: Path, monkeypatch):
    """A few-shot curve (method x examples per class) and a zero-shot sweep that never sets examples_per_class:
    the zero-shot mean is a dashed line across the curve's plot, not a reason to skip the plot."""
    curve, flat = tmp_path / "curve", tmp_path / "zero"
    num = 0
    for method, base in (("full", 0.6), ("setfit", 0.65)):
        for k in (8, 16, 32):
            for seed in (1, 2):
                acc = base + k / 1000 + seed / 100
                over = [f"+method={method}", f"data.examples_per_class={k}", f"seed={seed}"]
                _job(curve, num, over, {"test/acc": acc, "best/val/acc": acc}, {"status": "completed"})
                num += 1
    for seed, acc in ((1, 0.55), (2, 0.57)):
        _job(flat, seed, ["+method=zero_shot", f"seed={seed}"], {"test/acc": acc}, {"status": "completed"})
        over = ["+method=zero_shot_llm", "data.examples_per_class=null", f"seed={seed}"]
        _job(flat, seed + 2, over, {"test/acc": acc + 0.2}, {"status": "completed"})
    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path, **kw: figures.append((fig, path)))
    result = report.report([curve, flat], metrics=["test/acc"])
    [(fig, path)] = figures
    assert path.name == "plot_data.examples_per_class.png"
    ax = fig.axes[0]
    flat_lines = [line for line in ax.get_lines() if line.get_label() == "zero_shot"]
    assert len(flat_lines) == 1 and list(flat_lines[0].get_ydata()) == pytest.approx([0.56, 0.56])
    llm = [line for line in ax.get_lines() if line.get_label().startswith("zero_shot_llm")]
    assert len(llm) == 1 and list(llm[0].get_ydata()) == pytest.approx([0.76, 0.76])
    curves = {t.get_text() for t in ax.get_legend().get_texts()}
    assert curves == {"full", "setfit", "zero_shot", "zero_shot_llm (data.examples_per_class=null)"}
    assert ax.get_legend().get_bbox_to_anchor().x0 > ax.bbox.x1  # beside the panel, not over the curves
    table = result["table"]
    assert set(table["method"]) == {"full", "setfit", "zero_shot", "zero_shot_llm"} and len(table) == 8


def test_a_group_one_sweep_leaves_at_its_default_is_named_from_the_job_config(tmp_path: Path):
    """Two sweeps side by side, the second setting model= and finetune=, the first keeping the experiment's defaults:
    the first's rows name the defaults (from .hydra/hydra.yaml), not empty cells; a job without one keeps a blank."""

    def hydra_choices(job: Path, **choices: str | None) -> None:
        lines = "".join(f"      {k}: {'null' if v is None else v}\n" for k, v in choices.items())
        (job / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    choices:\n{lines}")

    small, large = tmp_path / "minilm", tmp_path / "smollm2"
    for seed, acc in [(1, 0.79), (2, 0.81)]:
        job = _job(small, seed, ["experiment=e", f"seed={seed}"], {"test/acc": acc}, {"status": "completed"})
        hydra_choices(job, model="minilm", finetune="full", task=None)
        over = ["experiment=e", "model=smollm2", "finetune=lora", f"seed={seed}"]
        job = _job(large, seed, over, {"test/acc": acc + 0.03}, {"status": "completed"})
        hydra_choices(job, model="smollm2", finetune="lora", task=None)
    table = report.report([small, large], plots=False)["table"].set_index(["model", "finetune"])
    assert sorted(table.index) == [("minilm", "full"), ("smollm2", "lora")]
    assert table.loc[("minilm", "full"), "test/acc mean"] == pytest.approx(0.80)
    assert "experiment=e" in report.report([small, large], plots=False)["markdown"]  # shared: listed as fixed

    (small / "1" / ".hydra" / "hydra.yaml").unlink()  # no record of its choices: left blank, no error
    table = report.report([small, large], plots=False)["table"]
    assert sorted(table["model"].fillna("")) == ["", "minilm", "smollm2"]
