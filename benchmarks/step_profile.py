"""Where a training step's time goes: ftlab's step against the plain loop's, phase by phase, on one device.

    python benchmarks/step_profile.py --gpu --case minilm_rt/full --out /tmp/profile
    python benchmarks/step_profile.py --case tiny_bert/overhead          # the same on the CPU

For each runner (the plain loop, then ftlab; each in its own process, one after the other) and a case of
``benchmarks/cases.py``, after ``--warmup`` untimed steps:

- **phases** (host clock, no synchronisation inside a step, so what the Python side spends issuing the work;
  the step ends with a device synchronisation as in ``make bench``): data (fetch and copy to the device), forward
  (forward, loss and whatever the framework does in its training step), backward, optimizer (clipping, the
  optimizer and scheduler step) and the rest (the framework's hooks and logging between steps);
- **host syncs**: every call inside the timed steps that makes the host wait for the device (``.item()``,
  ``torch.bincount`` on CUDA, ...), by place in the code: ``torch.cuda.set_sync_debug_mode`` on a GPU; on the CPU the
  operators that would sync on one (``_local_scalar_dense``, ``nonzero``, ``bincount``, ...), through a dispatch mode;
- **operators per step** (the dispatcher's count) and ``torch.profiler``'s table of the top host-side operators,
  with a Chrome trace per runner in ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "src")]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

PHASES = ("data", "forward", "backward", "optimizer", "rest")
TAIL = 2  # untimed steps after the timed ones (the runners tear down while the last timed step is recorded)
# aten operators that read a device value back to the host (or size their output from one) on a CUDA device
SYNCING_OPS = {
    "_local_scalar_dense",
    "nonzero",
    "bincount",
    "unique",
    "_unique2",
    "unique_consecutive",
    "masked_select",
    "repeat_interleave",
    "equal",
    "is_nonzero",
}


def _place(skip: str = "") -> str:
    """The innermost frames outside torch and this file: where a sync was asked for."""
    frames = [
        f
        for f in traceback.extract_stack()
        if "/torch/" not in f.filename and "step_profile" not in f.filename and "warnings" not in f.filename
    ]
    return " <- ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in frames[::-1][:3])


class Probe:
    """Phase marks, sync and operator counts over the timed steps of one runner."""

    def __init__(self, warmup: int, steps: int, trace: Path | None):
        self.warmup, self.steps, self.trace = warmup, steps, trace
        self.step = 0  # steps completed
        self.marks: list[tuple[str, float]] = []
        self.phases: dict[str, list[float]] = {p: [] for p in PHASES}
        self.totals: list[float] = []
        self.syncs: collections.Counter[str] = collections.Counter()
        self.ops: collections.Counter[str] = collections.Counter()
        self.cuda = torch.cuda.is_available()
        self.profiler: Any = None
        self._mode: Any = None

    @property
    def timed(self) -> bool:
        return self.warmup <= self.step < self.warmup + self.steps

    @property
    def counting(self) -> bool:
        """CPU: the operator count (a dispatch mode, slow) runs on the first timed steps, which are not timed."""
        return not self.cuda and self.warmup <= self.step < self.warmup + self.counted

    @property
    def counted(self) -> int:
        return 0 if self.cuda else min(5, self.steps // 3)

    @property
    def total(self) -> int:
        return self.warmup + self.steps + TAIL

    # the gate interface of runners.plain_loop (as runners.Ring): start, mark, step_end, finished, result
    def start(self) -> None:
        self.begin()

    def step_end(self) -> None:
        self.end()
        if not self.finished:
            self.begin()

    @property
    def finished(self) -> bool:
        return self.step >= self.total

    def result(self) -> dict[str, Any]:
        return self.summary()

    def mark(self, phase: str) -> None:
        """The end of ``phase`` in the current step (host clock)."""
        self.marks.append((phase, time.perf_counter()))

    def begin(self) -> None:
        """A step starts (before its batch is fetched)."""
        self.marks = [("start", time.perf_counter())]
        if self.timed and (self.cuda or self.counting):
            self._watch(True)

    def end(self) -> None:
        """The step's optimizer work is issued: wait for the device, record, and count the step."""
        if self.timed and (self.cuda or self.counting):
            self._watch(False)
        if self.cuda:
            torch.cuda.synchronize()
        self.mark("rest")
        if self.timed and not self.counting:
            self._record()
        self.step += 1
        if self.profiler is not None:
            self.profiler.step()

    def _record(self) -> None:
        times = dict.fromkeys(PHASES, 0.0)
        for (_, before), (phase, at) in zip(self.marks, self.marks[1:], strict=False):
            times[phase] += at - before
        for phase, seconds in times.items():
            self.phases[phase].append(seconds)
        self.totals.append(self.marks[-1][1] - self.marks[0][1])

    def _watch(self, on: bool) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode("warn" if on else "default")
            return
        if on:
            self._mode = _CountOps(self)
            self._mode.__enter__()
        elif self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None

    def summary(self) -> dict[str, Any]:
        n = max(1, len(self.totals) if self.cuda else self.counted)  # the steps the syncs were counted over
        return {
            "steps": len(self.totals),
            "step_ms_median": 1000 * statistics.median(self.totals) if self.totals else None,
            "phase_ms_median": {p: 1000 * statistics.median(v) for p, v in self.phases.items() if v},
            "syncs_per_step": {k: v / n for k, v in self.syncs.most_common()},
            "ops_per_step": sum(self.ops.values()) / n if self.ops else None,
            "top_ops": {k: v / n for k, v in self.ops.most_common(25)},
        }


class _CountOps(TorchDispatchMode):
    """CPU: counts every operator, and the ones that would sync on a GPU by the place that called them."""

    def __init__(self, probe: Probe):
        super().__init__()
        self.probe = probe

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func._overloadpacket.__name__
        self.probe.ops[name] += 1
        if name in SYNCING_OPS:
            self.probe.syncs[f"{name} at {_place()}"] += 1
        return func(*args, **(kwargs or {}))


PROBE: Probe | None = None


def probe() -> Probe:
    assert PROBE is not None
    return PROBE


class PhaseMarks(pl.Callback):
    """ftlab's phases from Lightning's hooks (the order of one automatic-optimization step)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        probe().begin()

    def on_train_batch_start(self, *args: Any) -> None:
        probe().mark("data")  # fetched, and moved to the device by the strategy

    def on_before_backward(self, *args: Any) -> None:
        probe().mark("forward")

    def on_after_backward(self, *args: Any) -> None:
        probe().mark("backward")

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        probe().mark("optimizer")  # clipping, optimizer and scheduler steps (and the hooks around them)


class _EndOfStep(pl.Callback):
    """After every other callback's on_train_batch_end (added last): the 'rest' of the step ends here."""

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        p = probe()
        p.end()
        if p.step < p.warmup + p.steps + 1:
            p.begin()
        else:
            trainer.should_stop = True


def run_ftlab(cfg: Any) -> None:
    import tempfile

    from omegaconf import open_dict

    from ftlab.train import train

    p = probe()
    with tempfile.TemporaryDirectory() as tmp, open_dict(cfg):
        cfg.paths.output_dir = tmp
        cfg.trainer.max_steps = p.total
        cfg.trainer.max_epochs = -1
        cfg.callbacks["phase_marks"] = {"_target_": "step_profile.PhaseMarks"}
        cfg.callbacks["zz_end_of_step"] = {"_target_": "step_profile._EndOfStep"}
        train(cfg)


def run_plain(cfg: Any) -> None:
    """``runners.run_plain``'s loop, the probe timing its phases."""
    import runners

    backbone, head, datamodule = runners.build_parts(cfg)
    model = runners.Classifier(backbone, head, runners.frozen_groups(cfg, backbone))
    p = probe()
    runners.plain_loop(cfg, model, datamodule, p.warmup, p.steps, TAIL, gate=p)


def _sync_warnings(p: Probe) -> None:
    """On a GPU, sync debug mode warns at each syncing call: count them by place instead of printing them."""
    shown = warnings.showwarning

    def record(message: Any, category: Any, filename: str, lineno: int, *rest: Any) -> None:
        if "synchronizing" in str(message).lower() or "synchroniz" in str(message):
            p.syncs[_place()] += 1
        else:
            shown(message, category, filename, lineno, *rest)

    warnings.showwarning = record
    warnings.simplefilter("always")


def profile_runner(runner: str, overrides: list[str], warmup: int, steps: int, out: Path) -> dict[str, Any]:
    import cases

    global PROBE
    PROBE = Probe(warmup, steps, out)
    if PROBE.cuda:
        _sync_warnings(PROBE)
    cfg = cases.compose(overrides)
    profiled = max(1, min(10, steps // 2))
    activities = [torch.profiler.ProfilerActivity.CPU]
    if PROBE.cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = torch.profiler.schedule(wait=warmup + steps, warmup=1, active=profiled, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule) as prof:
        PROBE.profiler = prof
        (run_ftlab if runner == "ftlab" else run_plain)(cfg)
    PROBE.profiler = None
    out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out / f"trace_{runner}.json"))
    key = "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25)
    (out / f"ops_{runner}.txt").write_text(table)
    summary = PROBE.summary()
    summary["profiled_steps"] = profiled
    summary["profiler_top"] = table
    return summary


def _child(conn: Any, runner: str, overrides: list[str], warmup: int, steps: int, out: Path) -> None:
    import step_profile  # by name: the callbacks' _target_ resolve to this module's PROBE, not __mp_main__'s

    try:
        conn.send(("ok", step_profile.profile_runner(runner, overrides, warmup, steps, out)))
    except Exception:
        conn.send(("error", traceback.format_exc()))


def main(argv: list[str] | None = None) -> int:
    import cases

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", default="tiny_bert/overhead", help="a case of benchmarks/cases.py")
    parser.add_argument(
        "--gpu", action="store_true", help="the case's GPU settings (bf16, pinned worker batches)"
    )
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--runners", nargs="*", default=["plain", "ftlab"])
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides added to the case"
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/ftlab-step-profile"))
    args = parser.parse_args(argv)
    import tempfile

    built = {c.name: c for c in cases.build(False, tempfile.mkdtemp(prefix="ftlab-profile-"), args.gpu)}
    if args.case not in built:
        parser.error(f"--case {args.case!r} is not a case; the cases: {', '.join(built)}")
    case = built[args.case]
    results: dict[str, Any] = {}
    for runner in args.runners:
        overrides = [*case.variant("ftlab")[1], *args.set]
        context = mp.get_context("spawn")  # a fresh interpreter per runner: no CUDA state shared
        parent, child = context.Pipe()
        proc = context.Process(
            target=_child, args=(child, runner, overrides, args.warmup, args.steps, args.out)
        )
        proc.start()
        status, result = parent.recv()
        proc.join()
        if status != "ok":
            print(result, file=sys.stderr)
            return 1
        results[runner] = result
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.json").write_text(
        json.dumps({"case": args.case, "gpu": args.gpu, "results": results}, indent=2)
    )
    print(report(args.case, results))
    return 0


def report(case: str, results: dict[str, dict[str, Any]]) -> str:
    names = list(results)
    lines = [f"## {case}: median ms per timed step (host clock)", "", "| phase | " + " | ".join(names) + " |"]
    lines.append("| --- |" + " ---: |" * len(names))
    for phase in (*PHASES, "step"):
        cells = []
        for name in names:
            r = results[name]
            value = r["step_ms_median"] if phase == "step" else r["phase_ms_median"].get(phase)
            cells.append("-" if value is None else f"{value:.2f}")
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    ops = [results[n]["ops_per_step"] for n in names]
    if any(o is not None for o in ops):
        lines.append("| operators | " + " | ".join("-" if o is None else f"{o:.0f}" for o in ops) + " |")
    for name in names:
        lines += ["", f"host syncs per step, {name}:"]
        lines += [f"  {v:.2f}  {k}" for k, v in results[name]["syncs_per_step"].items()] or ["  none"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
