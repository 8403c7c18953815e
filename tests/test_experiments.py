"""The paper-style experiments: their grids compose, their scripts exist, and the transfer one runs end to end."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import InstantiationException
from hydra.utils import instantiate

import ftlab.runs.jobs  # noqa: F401  (registers the ftlab.* resolvers)
from ftlab.utils.errors import ConfigError

from conftest import CONF_DIR

ROOT = CONF_DIR.parent
# experiment -> (swept keys besides seed, jobs in its grid)
PAPERS = {
    "transfer_yosinski": ({"model.backbone.checkpoint_groups", "finetune"}, 30),
    "probe_vs_finetune": ({"finetune", "model.backbone.pretrained"}, 12),
    "llrd_sweep": ({"finetune.lr_decay"}, 15),
    "peft_table": ({"finetune"}, 9),
    "ulmfit_ablation": ({"finetune", "finetune.lr_decay", "scheduler"}, 24),
}
REQUIRED = ["model.backbone.checkpoint=/source/run"]  # transfer_yosinski's ??? key


def _compose(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_paper_experiment_grid_script_and_page(name):
    keys, jobs = PAPERS[name]
    for variant in (name, f"{name}_full"):
        cfg = _compose(f"experiment={variant}", *(REQUIRED if name == "transfer_yosinski" else []))
        params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
        assert set(params) == keys | {"seed"}, variant
        assert len(params["seed"]) >= 3
        assert cfg.name == variant
        if variant == name:
            assert math.prod(len(v) for v in params.values()) == jobs
        else:  # the full-scale version: one override away, on a GPU, with more data
            assert cfg.trainer.accelerator == "gpu"
            assert cfg.data.get("max_train_examples") is None
    script = ROOT / "scripts" / f"reproduce_{name}.sh"
    assert os.access(script, os.X_OK) and f"experiment={name}" in script.read_text()
    page = (ROOT / "docs" / f"{name}.md").read_text()
    assert f"scripts/reproduce_{name}.sh" in page
    assert "| n |" in page  # a table written by ftlab-report from the run made here, and its files beside it
    for file in ("results.md", "results.csv", "results.tex"):
        assert (ROOT / "docs" / name / file).is_file(), file


def test_probe_vs_finetune_image_half_switches_model_and_data():
    cfg = _compose("experiment=[probe_vs_finetune,probe_vs_finetune_image]")
    assert cfg.model.backbone._target_.endswith("EfficientNetLite0") and cfg.data.source == "mnist5k"
    assert set(cfg.hydra.sweeper.params) == {"finetune", "model.backbone.pretrained", "seed"}


def test_few_shot_curve_methods_sizes_and_zero_shot_baselines():
    """Issue #16's learning curve: 5 trained methods x 5 sizes x 5 seeds on one budget; each method is one choice of
    few_shot_method that sets the groups it needs; the zero-shot sweep drops examples_per_class (flat lines)."""
    cfg = _compose("experiment=few_shot_curve")
    params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
    assert params == {
        "few_shot_method": ["head_only", "full", "lora", "setfit", "prompt"],
        "data.examples_per_class": ["8", "16", "32", "64", "256"],
        "seed": ["1", "2", "3", "4", "5"],
    }
    assert cfg.trainer.max_steps == 32 and cfg.callbacks.early_stopping is None and not cfg.keep_checkpoints
    assert cfg.data.max_eval_examples == 256 and cfg.data.max_train_examples is None
    expected = {  # method -> (backbone, finetune target's peft method or freeze, zero_shot, prompt)
        "zero_shot_embedding": ("all-MiniLM", "ftlab.zero_shot.EmbeddingZeroShot", None),
        "zero_shot_llm": ("smollm2", "ftlab.zero_shot_llm.LLMZeroShot", None),
        "head_only": ("all-MiniLM", None, None),
        "full": ("all-MiniLM", None, None),
        "lora": ("all-MiniLM", None, None),
        "setfit": ("all-MiniLM", None, None),
        "prompt": ("smollm2", None, "ftlab.verbalizer.Verbalizer"),
    }
    for method, (backbone, zero_shot, prompt) in expected.items():
        cfg = _compose("experiment=few_shot_curve", f"few_shot_method={method}")
        assert backbone in cfg.model.backbone.name_or_path, method
        assert (cfg.get("zero_shot") or {}).get("_target_") == zero_shot, method
        assert (cfg.get("prompt") or {}).get("_target_") == prompt, method
        words = (cfg.get("zero_shot") or cfg.get("prompt") or {}).get("label_words")
        assert words is None or dict(words) == {"fresh": "positive", "rotten": "negative"}, method
        assert cfg.trainer.max_steps == 32, method  # the experiment's budget survives the method's choices
    assert _compose("experiment=few_shot_curve", "few_shot_method=head_only").finetune.freeze_backbone
    assert _compose("experiment=few_shot_curve", "few_shot_method=lora").finetune.peft.method == "lora"
    assert _compose("experiment=few_shot_curve", "few_shot_method=setfit").finetune.contrastive.pairs == 512
    full = _compose("experiment=few_shot_curve_full")
    assert (
        full.trainer.accelerator == "gpu"
        and full.data.max_eval_examples is None
        and full.trainer.max_steps > 32
    )
    script = (ROOT / "scripts" / "reproduce_few_shot_curve.sh").read_text()
    assert "few_shot_method=zero_shot_embedding,zero_shot_llm data.examples_per_class=null" in script


def test_freeze_transferred_freezes_exactly_the_copied_groups():
    cfg = _compose("experiment=transfer_yosinski", *REQUIRED, "model.backbone.checkpoint_groups=3",
                   "finetune=freeze_transferred")  # fmt: skip
    assert instantiate(cfg.finetune).k == 3
    assert "k" not in _compose("experiment=transfer_yosinski", *REQUIRED, "finetune=full").finetune
    for model in (
        "tiny_resnet",
        "minilm",
    ):  # no checkpoint_groups: nothing copied (text backbones take it too)
        cfg = _compose(f"model={model}", "finetune=freeze_transferred")
        with pytest.raises(InstantiationException, match="needs model.backbone.checkpoint_groups") as info:
            instantiate(cfg.finetune)
        assert isinstance(info.value.__cause__, ConfigError)
    cfg = _compose("model=minilm", "finetune=freeze_transferred", "model.backbone.checkpoint_groups=2")
    assert instantiate(cfg.finetune).k == 2


def test_transfer_script_copies_frozen_and_fine_tuned_groups(tmp_path):
    """reproduce_transfer_yosinski.sh on a tiny ResNet and 8x8 digits: network A, a 2 x 2 grid, the table."""
    tiny = "data=digits model=tiny_resnet model.backbone.input_size=16 trainer.max_epochs=1 trainer.accelerator=cpu"
    tiny += f" paths.cache_dir={tmp_path}/cache callbacks.progress_bar.kind=log"
    env = {**os.environ, "PYTHON": sys.executable, "LOG_DIR": str(tmp_path), "STAMP": "t",
           "SOURCE_OVERRIDES": f"{tiny} data.classes=[0,1,2,3,4]", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    grid = [*tiny.split(), "model.backbone.checkpoint_groups=0,2", "seed=1", "save_backbone=true"]
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "reproduce_transfer_yosinski.sh"), *grid],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    source = torch.load(tmp_path / "mnist_transfer_source" / "t" / "backbone.pt", weights_only=True)
    sweep = tmp_path / "multirun" / "transfer_yosinski_t"
    table = (sweep / "results.md").read_text()
    assert table.count("| freeze_transferred |") == 2 and table.count("| full |") == 2
    jobs = {}
    for job in sorted(p for p in sweep.iterdir() if p.name.isdigit()):
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        n = int(overrides.split("checkpoint_groups=")[1].split()[0])
        mode = overrides.split("finetune=")[1].split()[0]
        jobs[(n, mode)] = torch.load(job / "backbone.pt", weights_only=True)
    assert set(jobs) == {(0, "freeze_transferred"), (0, "full"), (2, "freeze_transferred"), (2, "full")}
    stem, top = "model.conv1.weight", "model.layer4.0.conv1.weight"
    # AnB, n=2: stem and layer1 are A's, bit for bit; the groups above trained from a fresh init
    assert torch.equal(jobs[(2, "freeze_transferred")][stem], source[stem])
    assert torch.equal(
        jobs[(2, "freeze_transferred")]["model.layer1.0.conv1.weight"], source["model.layer1.0.conv1.weight"]
    )
    assert not torch.equal(jobs[(2, "freeze_transferred")][top], source[top])
    # AnB+, n=2: copied, then fine-tuned: moved away from A, but far less than a fresh init is from A
    moved = (jobs[(2, "full")][stem] - source[stem]).norm()
    fresh = (jobs[(0, "full")][stem] - source[stem]).norm()
    assert 0 < moved < 0.5 * fresh
    # n=0 copies nothing: both modes train the same network from the same seed
    assert torch.equal(jobs[(0, "full")][stem], jobs[(0, "freeze_transferred")][stem])
