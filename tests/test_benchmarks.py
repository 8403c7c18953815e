"""The benchmark suite's quick mode: all three runners do the same steps, and the record and table are written."""

from __future__ import annotations

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
    table = (tmp_path / "quick.md").read_text()
    assert "| minilm_rt/head_only | plain |" in table and "% of matmul peak" in table and "ms/step" in table
