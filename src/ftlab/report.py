"""``ftlab-report``: turn finished sweeps into a results table (mean ± std over seeds and folds) and plots.

    ftlab-report outputs/multirun/<sweep> [more sweeps] [--metrics test/acc best/val/acc] [--ignore seed]

Jobs are grouped by their overrides (``metrics.json``'s ``overrides``, else ``.hydra/overrides.yaml``) with the
ignored keys (default ``seed`` and ``data.fold``: a k-fold sweep's folds, or its seeds x folds, are averaged) and
the where-to-write keys (``paths.*``, ``hydra.*``, ``resume``, ``logger``) removed; a config group that some jobs
set and others leave at its default (``model=smollm2`` in one sweep beside another that keeps ``minilm``) gets the
default's name from the job's ``.hydra/hydra.yaml`` rather than an empty cell. Per group: mean, sample
standard deviation (ddof=1; empty for n=1) and n of each metric, the trainable parameters and the mean wall time.
Writes ``results.md``, ``results.csv``, ``results.tex`` and ``plot_<key>.png`` (test/<monitored name> and
best/<monitor>, or ``--metrics``, against each swept numeric value, error bars = std; rows where that key is unset
or not a number, e.g. zero-shot runs beside a curve over examples per class, as dashed horizontal lines with a ±std
band; ``plot_settings.png``, one bar per row, when no swept key is numeric) into the first sweep folder (or
``--out``) and prints the Markdown table. Failed and unfinished jobs, and the trials an Optuna search pruned, are
listed under the table, never averaged.

A plain argparse CLI (not Hydra): its input is a folder, and it must not create an output folder of its own.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from ftlab.runs import folder
from ftlab.utils.errors import ConfigError, DataFileError, FtlabError
from ftlab.utils.safe_files import save_figure, write_frame, write_text

DROPPED = ("paths.", "hydra.", "hydra/", "resume", "logger")  # overrides that do not change the result
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # hydra.yaml is read once per job that needs it


def _job_dirs(sweep: Path) -> list[Path]:
    found = {p.parent.parent for p in sweep.rglob(folder.OVERRIDES_FILE)}
    found |= {p.parent for p in sweep.rglob(folder.METRICS_FILE)} | {
        p.parent for p in sweep.rglob(folder.STATUS_FILE)
    }
    # ftlab-eval/-export write a metrics.json of their own inside a job folder: those are not jobs
    jobs = {d for d in found if not any(other in d.parents for other in found)}
    return sorted((d for d in jobs if ".submitit" not in d.parts), key=lambda d: _natural(str(d)))


def _natural(text: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _overrides(job: Path, metrics: dict[str, Any] | None, ignore: set[str]) -> dict[str, str]:
    items = (metrics or {}).get("overrides")
    if items is None and (job / folder.OVERRIDES_FILE).is_file():
        items = yaml.safe_load((job / folder.OVERRIDES_FILE).read_text()) or []
    pairs = (str(item).lstrip("+~").split("=", 1) for item in items or [])
    return {
        k: v for k, v in (p for p in pairs if len(p) == 2) if k not in ignore and not k.startswith(DROPPED)
    }


def _choices(job: Path) -> dict[str, str]:
    """The config group options Hydra composed the job from (``hydra.runtime.choices``: ``model: minilm``, ...)."""
    try:
        saved = yaml.load((job / ".hydra" / "hydra.yaml").read_text(), Loader=_LOADER) or {}
    except (OSError, yaml.YAMLError):
        return {}
    choices = ((saved.get("hydra") or {}).get("runtime") or {}).get("choices") or {}
    return {str(k): str(v) for k, v in choices.items() if v is not None}


def _fill_group_defaults(frame: pd.DataFrame, jobs: list[Path]) -> pd.DataFrame:
    """Each override column that names a config group, filled where a job did not set it with the option the job
    was composed from (its default), read only for the jobs that need it."""
    columns = [c for c in frame.columns if c.startswith("override:")]
    missing = frame[columns].isna().any(axis=1) if columns else pd.Series(False, index=frame.index)
    choices = {i: _choices(jobs[i]) for i in frame.index[missing]}
    for column in columns:
        key = column.split(":", 1)[1]
        fill = pd.Series([choices.get(i, {}).get(key) for i in frame.index], index=frame.index, dtype=object)
        frame[column] = frame[column].where(frame[column].notna(), fill)
    return frame


def collect(sweeps: list[Path], ignore: set[str]) -> pd.DataFrame:
    """One row per job: ``job``, ``status`` (completed/failed/pruned/unfinished), ``error``, overrides, metrics."""
    rows, dirs = [], []
    for sweep in sweeps:
        if not sweep.is_dir():
            raise DataFileError(
                f"ftlab-report: {sweep} is not a folder; give a sweep folder (outputs/multirun/...)."
            )
        for job in _job_dirs(sweep):
            metrics = _read_json(job / folder.METRICS_FILE)
            status = _read_json(job / folder.STATUS_FILE) or {}
            state = status.get("status") or ("completed" if metrics else "unfinished")
            if state == "completed" and metrics is None:
                state = "unfinished"
            note = _pruned_note(status) if state == "pruned" else status.get("error", "")
            row: dict[str, Any] = {"job": str(job), "status": state, "error": note}
            row.update({f"override:{k}": v for k, v in _overrides(job, metrics, ignore).items()})
            if metrics is not None and state == "completed":
                row.update(
                    {
                        k: v
                        for k, v in metrics.items()
                        if isinstance(v, int | float) and not isinstance(v, bool)
                    }
                )
                row["monitor"] = metrics.get("monitor")
            rows.append(row)
            dirs.append(job)
    if not rows:
        raise DataFileError(
            f"ftlab-report: no job folders (with .hydra/, metrics.json or status.json) under {', '.join(map(str, sweeps))}."
        )
    return _fill_group_defaults(pd.DataFrame(rows), dirs)


def default_metrics(jobs: pd.DataFrame) -> list[str]:
    """The test metrics and each monitored ``best/<monitor>``, in the order of the records."""
    monitors = [f"best/{m}" for m in jobs.get("monitor", pd.Series(dtype=object)).dropna().unique()]
    return [c for c in jobs.columns if c.startswith("test/")] + [m for m in monitors if m in jobs.columns]


def _headline(jobs: pd.DataFrame) -> list[str]:
    """What the plots show by default: the monitored metric on the test set and its best validation value."""
    monitors = jobs.get("monitor", pd.Series(dtype=object)).dropna().unique()
    wanted = [f"test/{m.split('/', 1)[-1]}" for m in monitors] + [f"best/{m}" for m in monitors]
    return [m for m in wanted if m in jobs.columns]


def _value(text: str) -> Any:
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


def swept_keys(jobs: pd.DataFrame) -> tuple[list[str], dict[str, str]]:
    """The override keys that differ between jobs (the table's columns) and those every job shares."""
    cols = [c for c in jobs.columns if c.startswith("override:")]
    filled = jobs[cols].fillna("")
    varying = [c for c in cols if filled[c].nunique() > 1]
    fixed = {c.split(":", 1)[1]: filled[c].iloc[0] for c in cols if c not in varying}
    return varying, fixed


def summarize(jobs: pd.DataFrame, metrics: list[str], keys: list[str]) -> pd.DataFrame:
    """Mean, sample std (ddof=1) and n of each metric per group of completed jobs."""
    done = jobs[jobs["status"] == "completed"].copy()
    for m in metrics:
        done[m] = pd.to_numeric(done.get(m), errors="coerce")
    extra = [c for c in ("trainable_params", "wall_time_s") if c in done.columns]
    grouped = done.fillna({k: "" for k in keys}).groupby(keys, sort=False) if keys else [((), done)]
    rows = []
    for name, group in grouped:
        name = name if isinstance(name, tuple) else (name,)
        row: dict[str, Any] = {k.split(":", 1)[1]: v for k, v in zip(keys, name, strict=True)}
        row["n"] = len(group)
        for m in metrics:
            row[f"{m} mean"] = group[m].mean()
            row[f"{m} std"] = group[m].std(ddof=1)  # sample std; NaN for a single job
        if "trainable_params" in extra:
            row["trainable_params"] = int(group["trainable_params"].median())
        if "wall_time_s" in extra:
            row["wall_time_s mean"] = group["wall_time_s"].mean()
        rows.append(row)
    table = pd.DataFrame(rows)
    names = [k.split(":", 1)[1] for k in keys]
    if names and not table.empty:
        table = table.sort_values(names, key=lambda col: col.map(_sort_key)).reset_index(drop=True)
    return table


def _sort_key(value: Any) -> tuple[int, Any]:
    v = _value(value)  # numbers in numeric order, then names
    return (0, v) if isinstance(v, float) else (1, str(value))


def _fmt(mean: float, std: float) -> str:
    if mean is None or math.isnan(mean):
        return "–"
    return f"{mean:.4f}" if std is None or math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def _display(table: pd.DataFrame, metrics: list[str]) -> tuple[list[str], list[list[str]]]:
    keys = [c for c in table.columns if c == "n" or not (c.endswith(" mean") or c.endswith(" std"))]
    keys = [c for c in keys if c not in ("n", "trainable_params")]
    header = [*keys, *metrics, "n"]
    header += ["trainable params"] if "trainable_params" in table.columns else []
    header += ["wall time (s)"] if "wall_time_s mean" in table.columns else []
    body = []
    for _, r in table.iterrows():
        line = (
            [str(r[k]) for k in keys] + [_fmt(r[f"{m} mean"], r[f"{m} std"]) for m in metrics] + [str(r["n"])]
        )
        if "trainable_params" in table.columns:
            line.append(f"{int(r['trainable_params']):,}")
        if "wall_time_s mean" in table.columns:
            line.append(f"{r['wall_time_s mean']:.1f}")
        body.append(line)
    return header, body


def _excluded(jobs: pd.DataFrame, pruned: bool = False) -> list[str]:
    """The failed and unfinished jobs, or (``pruned``) the trials an Optuna search pruned."""
    bad = jobs[(jobs["status"] == "pruned") if pruned else ~jobs["status"].isin(["completed", "pruned"])]
    return [f"{r.job}: {r.status}" + (f" ({r.error})" if r.error else "") for r in bad.itertuples()]


def _pruned_note(status: dict[str, Any]) -> str:
    """Where the pruner stopped a trial (status.json of a pruned job, ftlab.search.pruning)."""
    value = status.get("value")
    shown = f"{value:.4g}" if isinstance(value, int | float) else value
    where = f"validation {status.get('step')} (epoch {status.get('epoch')})"
    return f"trial {status.get('trial')} stopped at {where}, {status.get('monitor')}={shown}"


def markdown(table: pd.DataFrame, metrics: list[str], jobs: pd.DataFrame, fixed: dict[str, str]) -> str:
    header, body = _display(table, metrics)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    notes = ["", "mean ± sample standard deviation (ddof=1) over the n completed jobs of each row."]
    if fixed:
        notes.append("Fixed in every job: " + ", ".join(f"{k}={v}" for k, v in fixed.items()) + ".")
    excluded = _excluded(jobs)
    if excluded:
        notes += ["", f"Excluded ({len(excluded)} failed or unfinished jobs):", *[f"- {e}" for e in excluded]]
    pruned = _excluded(jobs, pruned=True)
    if pruned:
        notes += ["", f"Pruned by the Optuna search ({len(pruned)} trials):", *[f"- {e}" for e in pruned]]
    return "\n".join(lines + notes) + "\n"


def latex(table: pd.DataFrame, metrics: list[str]) -> str:
    header, body = _display(table, metrics)

    def esc(text: str) -> str:
        return re.sub(r"([_%&#$])", r"\\\1", text).replace("±", "$\\pm$")

    lines = [
        r"\begin{tabular}{" + "l" * len(header) + "}",
        r"\toprule",
        " & ".join(map(esc, header)) + r" \\",
    ]
    lines += [
        r"\midrule",
        *[" & ".join(map(esc, row)) + r" \\" for row in body],
        r"\bottomrule",
        r"\end{tabular}",
    ]
    return "\n".join(lines) + "\n"


def plot(table: pd.DataFrame, metrics: list[str], keys: list[str], out: Path) -> list[Path]:
    """One PNG per swept numeric key: each metric's mean against the key, a line per setting of the other keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k.split(":", 1)[1] for k in keys]
    written = []
    for key in names:
        # rows whose value is not a number (unset, null, auto: e.g. zero-shot runs beside a curve over
        # data.examples_per_class) are drawn as horizontal lines: their value holds at every x
        numeric = table[key].map(lambda v: isinstance(_value(v), float))
        curve, flat = table[numeric], table[~numeric]
        if curve[key].nunique() < 2:
            continue
        others = [n for n in names if n != key]
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.5), squeeze=False)
        for ax, m in zip(axes[0], metrics, strict=True):
            groups = list(curve.groupby(others, sort=False)) if others else [("", curve)]
            colors: dict[str, str] = {}
            for label, part in groups:
                part = part.assign(_x=part[key].map(_value)).sort_values("_x")
                name = ", ".join(map(str, label if isinstance(label, tuple) else (label,)))
                drawn = ax.errorbar(
                    part["_x"],
                    part[f"{m} mean"],
                    yerr=part[f"{m} std"].fillna(0),
                    marker="o",
                    capsize=3,
                    label=name or None,
                )
                colors[name] = drawn[0].get_color()
            for i, (_, row) in enumerate(flat.iterrows(), start=len(groups)):
                name = ", ".join(str(row[n]) for n in others if row[n] != "")
                color = colors.get(name, f"C{i % 10}")  # the same setting's curve, if there is one
                mean, std = row[f"{m} mean"], row[f"{m} std"]
                label = name + (f" ({key}={row[key]})" if row[key] != "" else "")
                ax.axhline(mean, color=color, linestyle="--", label=label)
                if pd.notna(std):
                    ax.axhspan(mean - std, mean + std, color=color, alpha=0.12, linewidth=0)
            xs = curve[key].map(_value)
            if xs.min() > 0 and xs.max() / xs.min() >= 10:  # learning rates, weight decays: log scale
                ax.set_xscale("log")
            ax.set(xlabel=key, ylabel=m)
        if others or not flat.empty:  # one legend, beside the last panel, never over a curve
            axes[0][-1].legend(
                fontsize="small",
                title=", ".join(others) or None,
                loc="upper left",
                bbox_to_anchor=(1.02, 1.0),
                borderaxespad=0.0,
            )
        fig.tight_layout()
        path = out / f"plot_{re.sub(r'[^A-Za-z0-9._-]+', '_', key)}.png"
        save_figure(fig, path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    if not written and names and len(table) > 1:  # nothing numeric to put on an axis: one bar per row
        written.append(_bar_plot(table, metrics, names, out))
    return written


def _bar_plot(table: pd.DataFrame, metrics: list[str], names: list[str], out: Path) -> Path:
    """``plot_settings.png``: each metric's mean per row (the row's swept values as its label), error bars = std."""
    import matplotlib.pyplot as plt

    labels = [", ".join(f"{n}={r[n]}" for n in names if str(r[n]) != "") for _, r in table.iterrows()]
    height = 0.9 + 0.32 * len(table)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics) + 3, height), squeeze=False)
    for i, (ax, m) in enumerate(zip(axes[0], metrics, strict=True)):
        mean, std = table[f"{m} mean"], table[f"{m} std"].fillna(0)
        ax.barh(range(len(table)), mean, xerr=std, capsize=3)
        ax.set_yticks(range(len(table)), labels if i == 0 else [""] * len(table), fontsize="small")
        ax.invert_yaxis()  # the first row on top, as in the table
        lows, highs = (mean - std).min(), (mean + std).max()
        ax.set_xlim(max(0.0, lows - 0.1 * (highs - lows + 1e-9)), highs + 0.05 * (highs - lows + 1e-9))
        ax.set(xlabel=m)
    fig.tight_layout()
    path = out / "plot_settings.png"
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def report(
    sweeps: list[Path],
    metrics: list[str] | None = None,
    ignore: tuple[str, ...] = ("seed", "data.fold"),
    out: Path | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Write the results files for ``sweeps``; returns the table, the jobs and the written paths."""
    jobs = collect(sweeps, set(ignore))
    plotted = metrics or _headline(jobs)
    metrics = metrics or default_metrics(jobs)
    unknown = [m for m in metrics if m not in jobs.columns]
    if unknown:
        known = sorted(c for c in jobs.columns if "/" in c and not c.startswith("override:"))
        raise ConfigError(
            f"ftlab-report --metrics {' '.join(unknown)}: not in any completed job's metrics.json. "
            f"Available: {', '.join(known) or 'none (no job completed)'}."
        )
    keys, fixed = swept_keys(jobs)
    table = summarize(jobs, metrics, keys)
    out = out or sweeps[0]
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(table, metrics, jobs, fixed)
    write_text(out / "results.md", md)
    write_frame(out / "results.csv", table, index=False)
    write_text(out / "results.tex", latex(table, metrics))
    written = plot(table, plotted, keys, out) if plots and not table.empty else []
    return {"table": table, "jobs": jobs, "markdown": md, "plots": written, "out": out}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ftlab-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", nargs="+", type=Path, help="sweep folders (outputs/multirun/<name>_<time>)")
    parser.add_argument(
        "--metrics", nargs="+", help="metrics to tabulate (default: test/* and best/<monitor>)"
    )
    parser.add_argument(
        "--ignore",
        nargs="*",
        default=["seed", "data.fold"],
        help="override keys averaged over (default: seed data.fold)",
    )
    parser.add_argument(
        "--out", type=Path, help="where to write the results (default: the first sweep folder)"
    )
    parser.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    args = parser.parse_args(argv)
    try:
        result = report(args.sweeps, args.metrics, tuple(args.ignore), args.out, plots=not args.no_plots)
    except FtlabError as err:
        folder.print_error(err)
        sys.exit(2)
    print(result["markdown"])
    print(
        f"written to {result['out']}: results.md, results.csv, results.tex"
        + "".join(f", {p.name}" for p in result["plots"])
    )


if __name__ == "__main__":
    main()
