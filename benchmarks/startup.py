"""``make bench`` (first part): how fast the CLIs answer before any training, median of 5 fresh processes each.

    python benchmarks/startup.py              # prints a table, writes results/startup/startup.json and .md
    python benchmarks/startup.py --runs 9

Cases: ``ftlab-train --help``; a config error (``trainer.max_epochs=abc``: checked before torch, Lightning and
transformers are imported, so nothing heavy loads); and, for scale, ``import torch, pytorch_lightning,
transformers`` alone, which every run pays once its config is checked. Run from an empty temporary folder, so a
failed check cannot leave a run folder behind in the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
CASES = {
    "ftlab-train --help": [str(BIN / "ftlab-train"), "--help"],
    "ftlab-train trainer.max_epochs=abc (config error, exit 2)": [
        str(BIN / "ftlab-train"),
        "trainer.max_epochs=abc",
    ],
    "ftlab-eval split=tst (config error, exit 2)": [str(BIN / "ftlab-eval"), "run=.", "split=tst"],
    "python -c 'import torch, pytorch_lightning, transformers' (for scale)": [
        sys.executable,
        "-c",
        "import torch, pytorch_lightning, transformers",
    ],
}
EXPECTED_RC = {"ftlab-train --help": 0}


def measure(argv: list[str], runs: int, cwd: Path, expected_rc: int) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU (user + system) seconds of ``runs`` fresh processes, after one untimed run that warms
    the file cache. On a shared machine the wall time grows with the load; the CPU time hardly does."""
    walls, cpus = [], []
    for i in range(runs + 1):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != expected_rc:
            sys.exit(
                f"{' '.join(argv)}: exit status {done.returncode}, expected {expected_rc}\n{done.stderr}"
            )
        if i:
            walls.append(round(elapsed, 3))
            cpus.append(round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 3))
    return walls, cpus


def table(rows: list[dict], load: float) -> str:
    lines = [
        f"load average {load:.1f} on {os.cpu_count()} CPUs at the start; median of {len(rows[0]['runs_s'])} runs",
        "",
        "| case | wall (s) | CPU (s) | wall, each run (s) |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        each = ", ".join(f"{t:.2f}" for t in r["runs_s"])
        lines.append(f"| `{r['case']}` | {r['median_s']:.2f} | {r['median_cpu_s']:.2f} | {each} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="timed runs per case (median reported)")
    parser.add_argument(
        "--out", type=Path, default=HERE / "results" / "startup", help="folder for the records"
    )
    args = parser.parse_args()
    rows = []
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for name, argv in CASES.items():
            expected = EXPECTED_RC.get(name, 0 if name.startswith("python") else 2)
            walls, cpus = measure(argv, args.runs, Path(tmp), expected)
            medians = {"median_s": statistics.median(walls), "median_cpu_s": statistics.median(cpus)}
            rows.append({"case": name, **medians, "runs_s": walls, "cpu_s": cpus})
            print(
                f"{medians['median_s']:6.2f} s wall {medians['median_cpu_s']:6.2f} s CPU  {name}", flush=True
            )
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": platform.platform(),
        "load": load,
        "cases": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "startup.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "startup.md").write_text(table(rows, load))
    print("\n" + table(rows, load) + f"\nwritten to {args.out}/startup.json, startup.md")


if __name__ == "__main__":
    main()
