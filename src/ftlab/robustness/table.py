"""A sweep's robustness table: each job's attack records, mean ± std over seeds, grouped as ``ftlab-report`` does.

    python -m ftlab.robustness.table outputs/multirun/<sweep> [more sweeps] [--metric acc] [--split test]

Reads ``<job>/eval/<split>_attack_<name>/metrics.json`` (``ftlab-eval run=<job> attack=<name>``) for every job
that ``ftlab-report`` finds, and tabulates the job's own ``<split>/<metric>`` (clean) beside ``<name>@<strength>/
<split>/<metric>`` for every attack and strength, with ftlab-report's grouping (overrides without ``seed``),
statistics (mean ± sample std over the n jobs) and Markdown. Writes ``robustness.md`` and ``robustness.csv`` into
the first sweep folder (or ``--out``) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from ftlab import report
from ftlab.runs import folder
from ftlab.utils.errors import DataFileError, FtlabError


def attack_columns(job: Path, split: str, metric: str) -> dict[str, float]:
    """``<name>@<strength>/<split>/<metric>`` of every attack record of ``job``."""
    values: dict[str, float] = {}
    for path in sorted((job / "eval").glob(f"{split}_attack_*/{folder.METRICS_FILE}")):
        record = json.loads(path.read_text())
        values.update(
            {k: float(v) for k, v in record.items() if "@" in k and k.endswith(f"/{split}/{metric}")}
        )
    return values


def _strength(column: str) -> tuple[str, float]:
    name, _, rest = column.partition("@")
    return name, float(rest.split("/", 1)[0])


def robustness_table(
    sweeps: list[Path], metric: str = "acc", split: str = "test", out: Path | None = None
) -> dict[str, Any]:
    """Write ``robustness.md``/``.csv`` for ``sweeps``; returns the table and the Markdown."""
    jobs = report.collect(sweeps, {"seed", "data.fold"})
    extra = [attack_columns(Path(job), split, metric) for job in jobs["job"]]
    attacked = sorted({c for row in extra for c in row}, key=_strength)
    if not attacked:
        raise DataFileError(
            f"No job under {', '.join(map(str, sweeps))} has an attack record <job>/eval/{split}_attack_<name>/"
            f"metrics.json: run ftlab-eval run=<job> attack=<name> on each job first (scripts/reproduce_adversarial_"
            "*.sh do)."
        )
    jobs = pd.concat([jobs, pd.DataFrame(extra, index=jobs.index)], axis=1)
    metrics = [f"{split}/{metric}", *attacked]
    keys, fixed = report.swept_keys(jobs)
    table = report.summarize(jobs, metrics, keys)
    md = report.markdown(table, metrics, jobs, fixed)
    out = out or sweeps[0]
    out.mkdir(parents=True, exist_ok=True)
    (out / "robustness.md").write_text(md)
    table.to_csv(out / "robustness.csv", index=False)
    return {"table": table, "markdown": md, "out": out}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ftlab.robustness.table", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("sweeps", nargs="+", type=Path, help="sweep folders (outputs/multirun/<name>_<time>)")
    parser.add_argument("--metric", default="acc", help="the metric to tabulate (default acc)")
    parser.add_argument("--split", default="test", help="the split the attacks ran on (default test)")
    parser.add_argument("--out", type=Path, help="where to write (default: the first sweep folder)")
    args = parser.parse_args(argv)
    try:
        result = robustness_table(args.sweeps, args.metric, args.split, args.out)
    except FtlabError as err:
        folder.print_error(err)
        sys.exit(2)
    print(result["markdown"])
    print(f"written to {result['out']}: robustness.md, robustness.csv")


if __name__ == "__main__":
    main()
