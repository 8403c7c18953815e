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
