"""``make bench`` (first part): how fast the CLIs answer before any training, median of 5 fresh processes each.

    python benchmarks/startup.py              # prints a table, writes results/startup.json and startup.md
    python benchmarks/startup.py --runs 9

Cases: ``ftlab-train --help``; a config error (``trainer.max_epochs=abc``: checked before torch, Lightning and
transformers are imported, so nothing heavy loads); and, for scale, ``import torch, pytorch_lightning,
transformers`` alone, which every run pays once its config is checked. Run from an empty temporary folder, so a
failed check cannot leave a run folder behind in the repository.
"""

from __future__ import annotations

import argparse
import json
import platform
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


def measure(argv: list[str], runs: int, cwd: Path, expected_rc: int) -> list[float]:
    """Wall-clock seconds of ``runs`` fresh processes (after one untimed run that warms the file cache)."""
    times = []
    for i in range(runs + 1):
        start = time.perf_counter()
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        if done.returncode != expected_rc:
            sys.exit(
                f"{' '.join(argv)}: exit status {done.returncode}, expected {expected_rc}\n{done.stderr}"
            )
        if i:
            times.append(round(elapsed, 3))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="timed runs per case (median reported)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for startup.json / .md")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, argv in CASES.items():
            expected = EXPECTED_RC.get(name, 0 if name.startswith("python") else 2)
            times = measure(argv, args.runs, Path(tmp), expected)
            rows.append({"case": name, "median_s": statistics.median(times), "runs_s": times})
            print(f"{statistics.median(times):6.2f} s  {name}   {times}", flush=True)
    lines = ["| case | median (s) | runs (s) |", "| --- | --- | --- |"]
    lines += [
        f"| `{r['case']}` | {r['median_s']:.2f} | {', '.join(f'{t:.2f}' for t in r['runs_s'])} |"
        for r in rows
    ]
    record = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.platform(), "cases": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "startup.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "startup.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines) + f"\n\nwritten to {args.out}/startup.json, startup.md")


if __name__ == "__main__":
    main()
