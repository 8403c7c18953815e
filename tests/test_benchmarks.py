"""The benchmark suite's quick mode: all three runners do the same steps taking turns, and the record and table are
written."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_quick_benchmark_runs_three_runners_and_writes_results(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "--quick",
            "--cases",
            "minilm_rt/head_only",
            "--repetitions",
            "1",
            "--out",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "quick.json").read_text())
    assert record["matmul_peak_flops_per_s"] > 1e8
    (result,) = record["results"]
    assert set(result["examples_per_s"]) == {"ftlab", "plain", "hf_trainer"}
    assert all(rate > 0 for rate in result["examples_per_s"].values())
    assert set(result["ratios"]) == {"ftlab/plain", "ftlab/hf_trainer"}
    assert result["flops_per_example"] > 0 and all(v > 0 for v in result["peak_rss_mb"].values())
    # the runners took turns step by step: 4 timed steps each, and no two steps (of any runners) overlapped in time
    (spans,) = result["step_spans"]
    assert {name: len(s) for name, s in spans.items()} == {"ftlab": 4, "plain": 4, "hf_trainer": 4}
    steps = sorted((start, end, name) for name, s in spans.items() for start, end in s)
    assert all(end > start for start, end, _ in steps)
    assert all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(steps)), steps
    # and strictly in turn: each runner's steps are separated by the other two runners' steps
    order = [name for _, _, name in steps]
    assert all(order[i] != order[i + 1] for i in range(len(order) - 1)), order
    table = (tmp_path / "quick.md").read_text()
    assert "| minilm_rt/head_only | plain |" in table and "% of matmul peak" in table and "ms/step" in table


def test_gpu_cases_compose_with_the_same_gpu_settings_for_every_runner():
    """``--gpu`` (run on a GPU machine): every case composes, on CUDA in bf16 autocast, with loader and padding
    settings explicit so that the plain loop and Trainer, which have no Lightning trainer to resolve ``auto``
    against, get what ftlab gets."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import cases

    for case in cases.build(quick=False, cache_dir="/tmp/unused", gpu=True):
        for runner in case.runners:
            cfg = cases.compose(case.variant(runner)[1])
            assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed", case.name
            assert (cfg.data.num_workers, cfg.data.pin_memory) == (2, True), case.name
            if cfg.data._target_.endswith("TextClassificationDataModule"):
                assert cfg.data.pad_to_multiple_of == 8, case.name


def test_gpu_suite_sizes_and_compiled_variants():
    """The GPU suite of issue #19: MiniLM at batch 32 and 128, a BERT-base-sized model at batch 32 and length 128,
    each against the plain loop and Trainer; the compile cases add ftlab compiled and with CUDA graphs."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import cases

    built = {case.name: case for case in cases.build(quick=False, cache_dir="/tmp/unused", gpu=True)}
    sizes = {
        "minilm_rt/full": (32, 64, 384),
        "minilm_rt_b128/full": (128, 64, 384),
        "bert_base_rt128/full": (32, 128, 768),
    }
    for name, (batch, length, width) in sizes.items():
        case = built[name]
        assert case.runners == ("ftlab", "plain", "hf_trainer")
        cfg = cases.compose(case.variant("plain")[1])
        assert (cfg.data.batch_size, cfg.data.max_length) == (batch, length)
        overrides = cfg.model.backbone.get("config_overrides") or {}
        assert overrides.get("hidden_size", 384) == width
        if width == 768:
            assert overrides["num_hidden_layers"] == 12 and cfg.model.backbone.pretrained is False
        compiled = built[name.replace("/full", "/compile")]
        settings = {runner: cases.compose(compiled.variant(runner)[1]).compile for runner in compiled.runners}
        assert settings == {
            "ftlab": False,
            "plain": False,
            "ftlab_compile": True,
            "ftlab_cudagraphs": "reduce-overhead",
        }
        assert compiled.variant("ftlab_cudagraphs")[0] == "ftlab"


def test_step_profile_finds_no_host_sync_in_ftlab_step(tmp_path):
    """benchmarks/step_profile.py on the CPU: ftlab's training step asks for no host-device sync of its own. Before
    the metric updates were deferred (ftlab.models.module.PendingUpdates) and the step loss left the progress-bar
    values, every step had two that the plain loop does not: torchmetrics' bincount and Lightning's conversion of
    progress-bar values. What is left is the model's own (transformers' attention mask check, in both runners)
    and the clipping check that runs on CPU only (models/clipping.py skips it on a GPU)."""
    out = tmp_path / "profile"
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/step_profile.py",
            "--warmup",
            "4",
            "--steps",
            "15",
            "--out",
            str(out),
            "--set",
            "data.max_train_examples=400",
        ],  # fmt: skip
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "profile.json").read_text())["results"]
    assert set(results) == {"plain", "ftlab"}
    for runner in ("plain", "ftlab"):
        assert results[runner]["steps"] == 15 - 5  # the first 5 timed steps count operators, untimed
        assert set(results[runner]["phase_ms_median"]) == {"data", "forward", "backward", "optimizer", "rest"}
    model_own = [place for place in results["plain"]["syncs_per_step"] if "transformers/" in place]
    assert model_own, "the plain loop's attention-mask sync was not seen: the sync counter counts nothing"
    ftlab_own = [
        place
        for place in results["ftlab"]["syncs_per_step"]
        if "transformers/" not in place and "ftlab/models/clipping.py" not in place
    ]
    # at most the one conversion of a logged value in the counted steps (every log_every_n_steps, not per step)
    assert sum(results["ftlab"]["syncs_per_step"][p] for p in ftlab_own) <= 0.2, ftlab_own
    assert (out / "trace_ftlab.json").is_file() and "Self CPU" in (out / "ops_ftlab.txt").read_text()
    assert results["ftlab"]["ops_per_step"] < results["plain"]["ops_per_step"] * 1.1
