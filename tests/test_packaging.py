"""ftlab as users get it: a built wheel (config tree inside), installed beside the dependencies, used from any folder.

The wheel tests build from this tree (``pip wheel --no-deps --no-build-isolation``: offline), install it with
``--target`` into a folder put first on ``PYTHONPATH`` (so the installed ftlab, not this clone, is imported; the
dependencies are this environment's), and run the console scripts from empty folders.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from ftlab.runs import folder

from conftest import read_json, tiny_reviews

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
OPTIONAL = (
    "onnx",
    "onnxruntime",
    "wandb",
    "tensorboard",
    "optuna",
    "sqlalchemy",
    "alembic",
    "mlxtend",
)


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_every_package_is_listed_for_the_wheel():
    # pyproject lists packages (ftlab.conf lives outside src/): a package left out would be missing from the wheel
    found = {  # ftlab's packages and its Hydra plugin (in the hydra_plugins namespace package)
        ".".join(p.parent.relative_to(ROOT / "src").parts)
        for top in ("ftlab", "hydra_plugins")
        for p in (ROOT / "src" / top).rglob("__init__.py")
    }
    assert set(PYPROJECT["tool"]["setuptools"]["packages"]) == found | {"ftlab.conf"}


def test_core_holds_no_optional_feature_and_extras_name_them():
    core = _names(PYPROJECT["project"]["dependencies"])
    assert not core & set(OPTIONAL), core & set(OPTIONAL)
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"onnxruntime", "onnx"} <= _names(extras["onnx"]) and _names(extras["wandb"]) == {"wandb"}
    # ftlab's own sweeper on current Optuna: no pin of Optuna's database libraries holds an environment back
    assert "optuna" in _names(extras["optuna"]) and not {"sqlalchemy", "alembic"} & _names(extras["optuna"])
    everything = extras["all"][0]
    for extra in ("onnx", "wandb", "tensorboard", "optuna", "joblib", "slurm", "demo"):
        assert extra in everything


def test_editable_install_reads_the_clones_conf_folder():
    # the config tree Hydra reads (pkg://ftlab.conf) is this clone's conf/: edits there apply at once
    assert folder.CONF_DIR == "pkg://ftlab.conf"
    assert folder.conf_path().resolve() == (ROOT / "conf").resolve()


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    """A wheel built from this tree, installed into its own folder; the environment that runs it."""
    base = tmp_path_factory.mktemp("wheel")
    tree = base / "tree"  # a copy, so building leaves no build/ or egg-info in the clone
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "local")
    for name in ("src", "conf"):
        shutil.copytree(ROOT / name, tree / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", base / "dist", tree], check=True
    )
    wheel = next((base / "dist").glob("ftlab-*.whl"))
    site = base / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-build-isolation", "--target", site, wheel], check=True
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "PATH": f"{site / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
    }
    where = subprocess.run(
        [sys.executable, "-c", "import ftlab.conf; print(ftlab.conf.__file__)"],
        env=env,
        cwd=base,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(site)  # the wheel's ftlab, not the clone's
    assert (site / "ftlab" / "conf" / "train.yaml").is_file() and (
        site / "ftlab" / "checks" / "schema.json"
    ).is_file()
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str], expect: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == expect, (
        f"{' '.join(cmd)}: {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    )
    return done


def tiny(csv: Path, cache: Path) -> list[str]:
    return [
        "model=tiny_bert",
        "data=text_files",
        f"data.train_file={csv}",
        "data.text_column=review",
        "data.label_column=stars",
        "data.max_length=16",
        "data.batch_size=8",
        f"paths.cache_dir={cache}",
        "trainer.accelerator=cpu",
        "callbacks.progress_bar.kind=log",
    ]


@pytest.mark.slow
def test_installed_wheel_trains_evaluates_predicts_exports_and_reports(installed, tmp_path):
    work = tmp_path / "elsewhere"  # an unrelated, empty folder
    work.mkdir()
    csv = tmp_path / "reviews.csv"
    tiny_reviews().to_csv(csv, index=False)
    args = tiny(csv, tmp_path / "cache")

    helped = run(["ftlab-train", "--help"], work, installed)
    assert "model: " in helped.stdout and "tiny_bert" in helped.stdout
    run(["ftlab-train", "debug=fdr", *args], work, installed)
    (fdr_run,) = (work / "outputs" / "train").iterdir()
    assert "test/acc" in read_json(fdr_run / "metrics.json")

    run(["ftlab-train", "-m", *args, "trainer.max_epochs=1", "seed=1"], work, installed)
    (sweep,) = (work / "outputs" / "multirun").iterdir()
    job = sweep / "0"
    assert (job / "checkpoints" / "best.ckpt").is_file()
    run(["ftlab-eval", f"run={job}"], work, installed)
    assert "test/acc" in read_json(job / "eval" / "test" / "metrics.json")
    run(["ftlab-predict", f"run={job}", 'inputs=["a wonderful film","boring and flat"]'], work, installed)
    assert len((job / "predictions" / "predictions.csv").read_text().strip().splitlines()) == 3
    run(["ftlab-export", f"run={job}", "format=onnx"], work, installed)
    assert list((job / "export").rglob("*.onnx"))
    run(["ftlab-report", str(sweep)], work, installed)
    assert (sweep / "results.md").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["outputs"]  # everything under this folder's outputs/


def _walkthrough_files() -> dict[str, str]:
    """The files of README's "Use ftlab in your own project": code blocks that name their path in a comment."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use ftlab in your own project", 1)[1].split("\n## ", 1)[0]
    files = {}
    for block in re.findall(r"```(?:yaml|python)\n(.*?)```", section, flags=re.S):
        named = re.search(r"^# ((?:conf|mypkg)/\S+\.(?:yaml|py))", block, flags=re.M)
        if named:
            files[named.group(1)] = block
    return files


@pytest.mark.slow
def test_readme_walkthrough_own_configs_and_data_module_with_the_installed_wheel(installed, tmp_path):
    project = tmp_path / "my_project"
    files = _walkthrough_files()
    assert {"mypkg/data.py", "conf/data/my_reviews.yaml", "conf/experiment/my_exp.yaml"} <= set(files)
    for name, text in files.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    (project / "mypkg" / "__init__.py").write_text("")
    (project / "data").mkdir()
    reviews = tiny_reviews()
    reviews["stars"] = [5 if label == "pos" else 1 for label in reviews["stars"]]
    reviews.to_csv(project / "data" / "reviews.csv", index=False)
    env = {**installed, "PYTHONPATH": f"{project}{os.pathsep}{installed['PYTHONPATH']}"}
    fast = [
        "model=tiny_bert",
        "debug=fdr",
        "trainer.accelerator=cpu",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]

    helped = run(["ftlab-train", "--config-dir", "conf", "--help"], project, env)
    assert re.search(r"^data: .*my_reviews", helped.stdout, flags=re.M)
    bad = run(
        ["ftlab-train", "--config-dir", "conf", "experiment=my_exp", "data.threshold=high"], project, env, 2
    )
    assert (
        "data.threshold='high'" in bad.stderr
        and "mypkg.data.MyDataModule's threshold takes an integer" in bad.stderr
    )
    assert not (project / "outputs").exists()

    run(["ftlab-train", "--config-dir", "conf", "experiment=my_exp", *fast], project, env)
    (run_dir,) = (project / "outputs" / "my_exp").iterdir()
    metrics = read_json(run_dir / "metrics.json")
    assert (project / "data" / "reviews.labelled.csv").is_file()  # the user's data module did the reading
    assert read_json(run_dir / "labels.json")["names"] == ["neg", "pos"]
    assert 0 < metrics["trainable_params"] < metrics["total_params"]  # my_freeze: the bottom groups frozen
    saved = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "mypkg.data.MyDataModule" in saved and "k: 2" in saved

    run(["ftlab-train", "hydra.searchpath=[file://conf]", "experiment=my_exp", *fast], project, env)
    assert len(list((project / "outputs" / "my_exp").iterdir())) == 2
