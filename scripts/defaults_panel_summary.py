"""The defaults panel's table: each dataset's default run against the best point of its learning-rate sweep.

    python scripts/defaults_panel_summary.py outputs/multirun/panel_*_<stamp>

Reads the sweeps scripts/defaults_panel.sh wrote (``panel_<dataset>_default_<stamp>`` and
``panel_<dataset>_lr_<stamp>``), averages the test metric over seeds (mean ± std) and prints a Markdown table with
the share of the sweep's best reached by the defaults (goal: >= 95%). The default run is the sweep's point at the
family preset's rate: when the ``lr`` sweep has no runs at that rate (defaults_panel.sh leaves it out rather than
train it twice) the default runs stand for it.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def _metric(record: dict) -> str | None:
    """Entity F1 for tagging, accuracy for classification, R² for regression."""
    wanted = {"token_classification": "test/f1", "regression": "test/r2"}.get(
        record.get("task", ""), "test/acc"
    )
    return wanted if wanted in record else None


def _runs(sweep: Path) -> list[dict]:
    records = [json.loads(path.read_text()) for path in sorted(sweep.glob("*/metrics.json"))]
    return [{**record, "metric": _metric(record)} for record in records if _metric(record)]


def _mean(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(sweeps: list[Path]) -> str:
    found: dict[str, dict[str, Path]] = defaultdict(dict)
    for sweep in sweeps:
        match = re.match(r"panel_(.+)_(default|lr)_", sweep.name)
        if match:
            found[match.group(1)][match.group(2)] = sweep
    lines = [
        "| dataset | metric | defaults (lr) | best of 5 lrs (lr) | defaults / best | every rate (mean) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, pair in sorted(found.items()):
        default = _runs(pair["default"]) if "default" in pair else []
        swept = _runs(pair["lr"]) if "lr" in pair else []
        if not default or not swept:
            lines.append(f"| {name} | | (incomplete) | | | |")
            continue
        metric = default[0]["metric"]
        d_mean, d_std = _mean([r[metric] for r in default])
        by_lr: dict[float, list[float]] = defaultdict(list)
        for run in swept:
            by_lr[float(run["optimizer/lr"])].append(run[metric])
        by_lr.setdefault(float(default[0]["optimizer/lr"]), [r[metric] for r in default])
        best_lr, scores = max(by_lr.items(), key=lambda item: statistics.fmean(item[1]))
        b_mean, b_std = _mean(scores)
        rates = ", ".join(f"{lr:g}: {statistics.fmean(v):.3f}" for lr, v in sorted(by_lr.items()))
        lines.append(
            f"| {name} | {metric} | {d_mean:.3f} ± {d_std:.3f} ({default[0]['optimizer/lr']:g}) | "
            f"{b_mean:.3f} ± {b_std:.3f} ({best_lr:g}) | {100 * d_mean / b_mean:.0f}% | {rates} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(summarise([Path(p) for p in sys.argv[1:]]))
