"""Resident memory of one process running a sweep of many tiny jobs with Hydra's basic launcher.

    python benchmarks/sweep_memory.py [--jobs 30] [--out /tmp/ftlab_sweep_memory]

Runs ``ftlab-train -m`` over ``--jobs`` seeds of the tiny BERT (a few batches each) in one process and reads the
process's resident set size after each job (``benchmarks/rss_probe.py``, a Hydra callback, after a garbage
collection). Prints a JSON summary: RSS after job 5 and after the last job, and their ratio (goal: within 10%).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("/tmp/ftlab_sweep_memory"))
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "reviews.csv"
    rows = [f"great film {i},pos\ndull film {i},neg" for i in range(40)]
    data.write_text("text,label\n" + "\n".join(rows) + "\n")
    log = out / "rss.txt"
    log.unlink(missing_ok=True)
    seeds = ",".join(str(s) for s in range(args.jobs))
    command = [
        sys.executable, "-m", "ftlab.train", "-m", "model=tiny_bert", "data=text_files", f"data.train_file={data}",
        "data.max_length=16", "data.batch_size=8", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "trainer.num_sanity_val_steps=0",
        "trainer.accelerator=cpu", "callbacks.progress_bar.kind=log", f"seed={seeds}",
        f"paths.cache_dir={out / 'cache'}", f"hydra.sweep.dir={out / 'sweep'}",
        "+hydra.callbacks.rss._target_=rss_probe.RssProbe",
    ]  # fmt: skip
    env = {**os.environ, "FTLAB_RSS_LOG": str(log), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=out)
    assert done.returncode == 0, done.stderr[-3000:]
    rss = [float(line.split()[1]) for line in log.read_text().splitlines()]
    summary = {
        "jobs": len(rss),
        "rss_mib_after_job": {i + 1: v for i, v in enumerate(rss)},
        "after_job_5": rss[4],
        "after_last_job": rss[-1],
        "ratio_last_to_5": round(rss[-1] / rss[4], 4),
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
