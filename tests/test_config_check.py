"""The config check (ftlab.checks): bad values and unknown keys are found from the schema, before anything loads."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from ftlab.checks import find_problems
from ftlab.checks.check import load_schema
from ftlab.runs import folder

ROOT = Path(__file__).resolve().parents[1]

# (overrides, what the one problem must say). Spread over every group the issue names; the first nine are the
# issue's own list. A value is shown as the config holds it (a string quoted), an unknown key with its closest one.
BAD = [
    (
        ["trainer.max_epochs=abc"],
        ["trainer.max_epochs='abc'", "Trainer's max_epochs takes one of 'auto' or an integer or null"],
    ),
    (["data.max_train_examples=lots"], ["data.max_train_examples='lots'", "an integer or null"]),
    (["optimizer.lr=fast"], ["optimizer.lr='fast'", "AdamW's lr takes a number"]),
    (
        ["finetune=freeze_bottom", "finetune.k=two"],
        ["finetune.k='two'", "FinetunePolicy's k takes an integer"],
    ),
    (["data.val_fraction=abc"], ["data.val_fraction='abc'", "takes a number"]),
    (
        ["+trainer.max_epoch=3"],
        ["trainer.max_epoch=3", "no argument 'max_epoch'", "Did you mean trainer.max_epochs?"],
    ),
    (["+data.batchsize=8"], ["data.batchsize=8", "no argument 'batchsize'", "Did you mean data.batch_size?"]),
    (["callbacks.early_stopping.patience=soon"], ["callbacks.early_stopping.patience='soon'", "an integer"]),
    (["model.backbone.pooling=maxx"], ["model.backbone.pooling='maxx'", "one of 'cls', 'mean', 'pooler'"]),
    (["trainer.precision=99"], ["trainer.precision=99", "'bf16-mixed'", "not 99 (an integer)"]),
    (["trainer.accumulate_grad_batches=true"], ["trainer.accumulate_grad_batches=true", "takes an integer"]),
    (["data.batch_size=1.5"], ["data.batch_size=1.5", "takes an integer, not 1.5 (a number)"]),
    (["data.padding=left"], ["data.padding='left'", "one of 'longest', 'max_length'"]),
    (
        ["model.head.dropout=high"],
        ["model.head.dropout='high'", "ClassificationHead's dropout takes a number"],
    ),
    (
        ["+model.backbone.polling=cls"],
        ["model.backbone.polling='cls'", "Did you mean model.backbone.pooling?"],
    ),
    (["finetune=llrd", "finetune.lr_decay=fast"], ["finetune.lr_decay='fast'", "takes a number"]),
    (["optimizer.weight_decay=[0.1]"], ["optimizer.weight_decay=[0.1]", "takes a number"]),
    (["scheduler.name=cosinus"], ["scheduler.name='cosinus'", "one of 'linear', 'cosine', 'constant'"]),
    (["scheduler=slanted_triangular", "scheduler.cut_frac=x"], ["scheduler.cut_frac='x'", "takes a number"]),
    (["callbacks.model_checkpoint.save_top_k=best"], ["save_top_k='best'", "ModelCheckpoint's save_top_k"]),
    (["+callbacks.early_stopping.patiense=2"], ["Did you mean callbacks.early_stopping.patience?"]),
    (["callbacks.progress_bar.kind=fancy"], ["callbacks.progress_bar.kind='fancy'", "'rich', 'tqdm', 'log'"]),
    (["+logger.csv.save_dri=x"], ["logger.csv.save_dri='x'", "Did you mean logger.csv.save_dir?"]),
    (
        ["logger=tensorboard", "logger.tensorboard.default_hp_metric=maybe"],
        ["default_hp_metric='maybe'", "true or false"],
    ),
    (["seed=abc"], ["seed='abc'", "ftlab-train's seed takes an integer"]),
    (["monitor_mode=maximum"], ["monitor_mode='maximum'", "one of 'min', 'max'"]),
    (["feature_cache=sometimes"], ["feature_cache='sometimes'", "one of 'prefix' or true or false"]),
    (["+seedd=3"], ["seedd=3", "Did you mean seed?"]),
    (["module.label_smoothing=lots"], ["module.label_smoothing='lots'", "takes a number or null"]),
    (["data=text_files"], ["data.train_file is not set (??? in the config)"]),
]


def compose_train(overrides: list[str]) -> DictConfig:
    with initialize_config_module("ftlab.conf", version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize(("overrides", "expected"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_value_is_one_paragraph_naming_key_value_and_what_is_expected(overrides, expected):
    problems = find_problems(compose_train(overrides), "train")
    assert len(problems) == 1, problems
    assert "\n" not in problems[0]
    for words in expected:
        assert words in problems[0], problems[0]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (folder.conf_path() / group).glob("*.yaml"))


# Values a group option leaves to the user (???); everything else is the option as shipped.
FILL = {
    "data=text_files": ["data.train_file=x.csv"],
    "data=token_files": ["data.train_file=x.conll"],
    "data=image_folder": ["data.root=images"],
    "data=image_table": ["data.labels_file=labels.csv"],
    "data=hf_hub": ["data.hub_name=glue"],
    "data=torchvision": ["data.root=tv"],
    "finetune=freeze_transferred": ["model.backbone.checkpoint_groups=2"],  # the user's: groups copied
    "experiment=mnist_transfer_target": ["model.backbone.checkpoint=a/backbone.pt"],
    "experiment=transfer_yosinski": ["model.backbone.checkpoint=a"],
    "experiment=transfer_yosinski_full": ["model.backbone.checkpoint=a", "data.root=tv"],
}
GROUPS = [
    "data",
    "model",
    "finetune",
    "optimizer",
    "scheduler",
    "trainer",
    "callbacks",
    "logger",
    "experiment",
]
SHIPPED = [f"{g}={o}" for g in GROUPS for o in _options(g)] + [
    "debug=fdr",
    "debug=profiler",
    "hparams_search=optuna",
]


@pytest.mark.parametrize("choice", SHIPPED)
def test_every_shipped_option_passes_the_check(choice):
    # no false alarms: each config ftlab ships (with the values it leaves to the user) is clean
    assert find_problems(compose_train([choice, *FILL.get(choice, [])]), "train") == []


def test_eval_predict_export_keys_are_checked():
    with initialize_config_module("ftlab.conf", version_base="1.3"):
        evaluated = compose("eval", overrides=["run=r", "split=tst", "+splt=test"])
        exported = compose(
            "export", overrides=["run=r", "format=onnxx", "prune.fraction=half", "+prune.fractoin=1"]
        )
        predicted = compose("predict", overrides=["top_k=three"])
    problems = find_problems(evaluated, "eval")
    assert any("split='tst'" in p and "one of 'train', 'validation', 'test'" in p for p in problems), problems
    assert any("Did you mean split?" in p for p in problems), problems
    problems = find_problems(exported, "export")
    assert any("format='onnxx'" in p and "'onnx'" in p for p in problems), problems
    assert any("prune.fraction='half'" in p for p in problems), problems
    assert any("Did you mean prune.fraction?" in p for p in problems), problems
    problems = find_problems(predicted, "predict")
    assert any("inputs is not set" in p for p in problems) and any("top_k='three'" in p for p in problems)


def test_a_users_own_target_is_read_live(tmp_path, monkeypatch):
    # a _target_ the schema does not know is imported and its signature read (here a tiny module of the user's)
    (tmp_path / "userpkg.py").write_text(
        "def make_head(in_features: int, num_classes: int, width: int = 8):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = compose_train(
        ["model.head._target_=userpkg.make_head", "+model.head.width=wide", "+model.head.widht=3"]
    )
    problems = find_problems(cfg, "train")
    assert any(
        "model.head.width='wide'" in p and "userpkg.make_head's width takes an integer" in p for p in problems
    )
    assert any("Did you mean model.head.width?" in p for p in problems), problems
    cfg = compose_train(["model.head._target_=nopkg.Head"])
    assert any("model.head._target_=nopkg.Head: cannot be imported" in p for p in find_problems(cfg, "train"))


def _generator():
    spec = importlib.util.spec_from_file_location(
        "gen_config_schema", ROOT / "scripts" / "gen_config_schema.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_schema_is_up_to_date():
    fresh = _generator().build()
    shipped = (ROOT / "src" / "ftlab" / "checks" / "schema.json").read_text()
    if fresh != shipped:
        pytest.fail(
            "src/ftlab/checks/schema.json is stale: a constructor that a config targets, or a config's own keys, "
            "changed. Regenerate it with `make schema` (python scripts/gen_config_schema.py) and commit it.",
            pytrace=False,
        )


def test_schema_matches_the_live_signatures():
    # the check reads the schema, so the schema must hold what the real constructors take
    schema = load_schema()
    trainer = schema["targets"][schema["aliases"]["pytorch_lightning.Trainer"]]
    # Lightning's int or null, and ftlab's trainer.max_epochs=auto (ftlab.utils.budget)
    assert trainer["params"]["max_epochs"] == {
        "kind": "union",
        "options": [{"kind": "choice", "values": ["auto"]}, {"kind": "int"}, {"kind": "none"}],
    }
    assert not trainer["var_keyword"] and "callbacks" in trainer["params"]
    pooling = schema["targets"]["ftlab.models.backbones.text.HFTextBackbone"]["params"]["pooling"]
    assert pooling == {"kind": "choice", "values": ["cls", "mean", "pooler"]}


def test_composing_and_checking_import_no_torch_lightning_or_transformers():
    code = """
import json, sys
from ftlab import cli
from ftlab.utils.errors import ConfigError
cli.precheck("train", "train", ["model=tiny_bert", "debug=fdr"])
try:
    cli.precheck("train", "train", ["trainer.max_epochs=abc", "+data.batchsize=8"])
except ConfigError as err:
    caught = str(err)
heavy = [m for m in ("torch", "pytorch_lightning", "lightning", "transformers") if m in sys.modules]
print(json.dumps({"heavy": heavy, "caught": caught}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert "trainer.max_epochs='abc'" in result["caught"] and "data.batch_size" in result["caught"]


@pytest.mark.parametrize(
    "experiment", ["mnist_transfer_target", "transfer_yosinski", "transfer_yosinski_full"]
)
def test_an_experiments_required_key_left_null_is_a_problem(experiment):
    # ``???`` in an experiment cannot override the model config's ``checkpoint: null`` (OmegaConf keeps null), so
    # these experiments would have trained from scratch without the source network; ``required`` catches it
    overrides = [f"experiment={experiment}"] + (["data.root=tv"] if experiment.endswith("full") else [])
    problems = find_problems(compose_train(overrides), "train")
    assert problems == [
        f"model.backbone.checkpoint is not set, and {experiment} needs it (its required list): give it on the "
        "command line, e.g. model.backbone.checkpoint=<value>."
    ]
