"""``make bench``: ftlab's ``train()`` against a plain PyTorch loop and HF ``Trainer``, same work, alternating.

For every repetition of a case, one fresh worker process per runner is forked from this process (so all share the
imports and one process tree, and each has its own peak-memory figure). All runners train at once but take
turns step by step (``runners.Ring``: A, B, C, A, B, C, ..., the first runner rotated by the repetition), so only
one worker computes at a time and every runner's steps see the same machine conditions. Alternating whole runs
instead (as until 2026-11-26) left the ratios at the mercy of the shared host's drift over a run: ftlab/Trainer on
MiniLM moved between 0.93 and 1.02 from repetition to repetition. The ratio ftlab/plain is taken within each
repetition and the median over repetitions is reported; every timed step's start and end are in the JSON.

    python benchmarks/run.py            # the full suite (11 min 23 s on 2 CPU cores, measured 2026-11-26)
    python benchmarks/run.py --quick    # a smoke test on a tiny model (~20 s)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT / "src")]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cases  # noqa: E402
import runners  # noqa: E402  (imports torch, Lightning, transformers once, before the workers fork)
import torch  # noqa: E402
import transformers  # noqa: E402, F401

import ftlab.train  # noqa: E402, F401


def _worker(conn: Any, overrides: list[str], log_file: Path, turns: list[Any], index: int) -> None:
    """Runs commands from the parent: ("run", runner, warmup, steps), ("flops",), ("peak",), ("stop",)."""
    runners.RING = runners.Ring(turns, index)
    # Lightning/transformers chatter goes to the worker's log file; errors come back to the parent
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    while True:
        command = conn.recv()
        if command[0] == "stop":
            return
        try:
            if command[0] == "run":
                _, name, warmup, steps = command
                result = runners.RUNNERS[name](cases.compose(overrides), warmup, steps)
            elif command[0] == "flops":
                result = runners.step_flops(cases.compose(overrides))
            else:
                result = {"flops_per_s": runners.matmul_peak(gpu=bool(command[1:] and command[1]))}
            result["max_rss_mb"] = runners._max_rss_mb()
            conn.send(("ok", result))
        except Exception:
            conn.send(("error", traceback.format_exc()))


class Worker:
    log_dir = Path(tempfile.gettempdir())

    def __init__(
        self, overrides: list[str], name: str = "probe", turns: list[Any] | None = None, index: int = 0
    ):
        context = mp.get_context("fork")
        self.conn, child = context.Pipe()
        self.log_file = self.log_dir / f"{name.replace('/', '_')}.log"
        turns = turns if turns is not None else [context.Semaphore(1)]
        self.process = context.Process(
            # not daemonic: a runner with loader workers (data.num_workers, the --gpu cases) starts children; on an
            # error the parent terminates every worker itself (main)
            target=_worker,
            args=(child, overrides, self.log_file, turns, index),
            daemon=False,
        )
        self.process.start()

    def send(self, *command: Any) -> None:
        self.conn.send(command)

    def receive(self) -> dict[str, Any]:
        status, result = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"worker failed (log: {self.log_file}):\n{result}")
        return result

    def call(self, *command: Any) -> dict[str, Any]:
        self.send(*command)
        return self.receive()

    def stop(self) -> None:
        self.conn.send(("stop",))
        self.process.join(timeout=30)


def run_case(case: cases.Case, plan: cases.Plan, forced_reps: int | None = None) -> dict[str, Any]:
    """All repetitions of one case; every runner in its own forked worker."""
    flops = {"flops_per_example": None}
    if case.count_flops:
        probe = Worker(case.variant(case.runners[0])[1], f"{case.name}_flops")
        flops = probe.call("flops")
        probe.stop()
    names = list(case.runners)
    turns = [mp.get_context("fork").Semaphore(0) for _ in names]  # worker i hands the turn to i + 1
    steps = case.steps or plan.steps
    reps: list[dict[str, float]] = []
    spans: list[dict[str, list]] = []
    rss = dict.fromkeys(names, 0.0)
    for rep in range(forced_reps or case.repetitions or plan.repetitions):
        # fresh workers every repetition: a process keeps its heap history and physical page placement for its
        # whole life, which biased one runner by 2-4% for all repetitions of a case in some runs (docs/speed.md)
        workers = {
            name: Worker(case.variant(name)[1], f"{case.name}_{name}", turns, i)
            for i, name in enumerate(names)
        }
        # on an error, main() terminates the other workers (they may be waiting for a turn that will not come)
        for name in names:
            workers[name].send("run", case.variant(name)[0], case.warmup or plan.warmup, steps)
        first = rep % len(names)
        turns[first].release()  # the ring starts at a rotated runner
        results: dict[str, dict[str, Any]] = {}
        pending = {w.conn: name for name, w in workers.items()}
        # in order of arrival: a failed worker is reported at once, not after the others time out
        while pending:
            for conn in wait(list(pending)):
                name = pending.pop(conn)
                results[name] = workers[name].receive()
        if not turns[first].acquire(timeout=60):  # the last step handed the turn back to the first runner
            raise RuntimeError(f"{case.name}: the ring did not end at {names[first]}: unequal step counts")
        for name in names:  # every worker reply carries the process's peak RSS so far
            rss[name] = max(rss[name], results[name]["max_rss_mb"])
        for w in workers.values():
            w.stop()
        reps.append({name: steps * case.batch_size / results[name]["seconds"] for name in names})
        spans.append(
            {name: [[round(a, 4), round(b, 4)] for a, b in results[name]["spans"]] for name in names}
        )
        print(
            f"  {case.name} rep {rep} (from {names[first]}) "
            + "  ".join(f"{name} {rate:.2f}" for name, rate in reps[-1].items())
            + " examples/s",
            flush=True,
        )
    return {**summarise(case, reps, rss, flops), "step_spans": spans}


def summarise(case: cases.Case, reps: list[dict[str, float]], rss: dict, flops: dict) -> dict[str, Any]:
    median = {name: statistics.median(r[name] for r in reps) for name in case.runners}
    ratios, top = {}, case.baseline
    for other in case.runners:
        if other != top:
            ratios[f"{top}/{other}"] = statistics.median(r[top] / r[other] for r in reps)
    return {
        "case": case.name,
        "overrides": case.overrides,
        "batch_size": case.batch_size,
        "examples_per_s": median,
        "repetitions": reps,
        "ratios": ratios,
        "baseline": top,
        "peak_rss_mb": rss,
        "flops_per_example": flops["flops_per_example"],
        "achieved_flops_per_s": {
            k: v * flops["flops_per_example"] if flops["flops_per_example"] else None
            for k, v in median.items()
        },
    }


def table(results: list[dict[str, Any]], peak: float, gpu: bool = False) -> str:
    what = "8192x8192 bf16, CUDA" if gpu else "2048x2048 fp32, torch default threads"
    lines = [
        f"Matmul peak ({what}): {peak / 1e9:.1f} GFLOP/s",
        "",
        "| case | runner | examples/s (median) | ms/step | first runner / this one (median ratio) | peak RSS (MB) | GFLOP/s "
        + ("| MFU (% of the bf16 matmul peak) |" if gpu else "| % of matmul peak |"),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for res in results:
        if "skipped" in res:
            lines.append(f"| {res['case']} | skipped: {res['skipped']} | | | | | | |")
            continue
        for name, rate in res["examples_per_s"].items():
            ratio = res["ratios"].get(f"{res['baseline']}/{name}")
            achieved = res["achieved_flops_per_s"][name]
            flops = f"{achieved / 1e9:.1f} | {100 * achieved / peak:.1f}" if achieved else "- | -"
            lines.append(
                f"| {res['case']} | {name} | {rate:.2f} | {1000 * res['batch_size'] / rate:.1f} "
                f"| {'' if ratio is None else f'{ratio:.3f}'} "
                f"| {res['peak_rss_mb'][name]:.0f} | {flops} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The benchmark; on any error every worker still alive is terminated (they are not daemonic, and the others
    of a repetition may be waiting for a turn that will not come)."""
    try:
        return _main(argv)
    finally:
        for child in mp.active_children():
            child.terminate()


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke test")
    parser.add_argument("--cases", nargs="*", help="run only these cases (names as in the table)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for the JSON and Markdown")
    parser.add_argument("--repetitions", type=int, help="override the plan's repetitions")
    parser.add_argument("--steps", type=int, help="override the plan's timed steps per repetition")
    parser.add_argument("--warmup", type=int, help="override the plan's untimed steps before the timed ones")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="Hydra overrides added to every case, e.g. model.backbone.pretrained=false (same compute, no weights)",
    )
    parser.add_argument(
        "--gpu", action="store_true", help="on the CUDA device, in bf16 autocast (trainer=gpu's settings)"
    )
    args = parser.parse_args(argv)
    plan = cases.QUICK_PLAN if args.quick else cases.GPU_PLAN if args.gpu else cases.FULL_PLAN
    plan = cases.Plan(
        args.repetitions or plan.repetitions,
        args.warmup or plan.warmup,
        args.steps or plan.steps,
        plan.cache_dir,
    )
    selected = cases.build(args.quick, plan.cache_dir or tempfile.mkdtemp(prefix="ftlab-bench-"), args.gpu)
    if args.cases:
        selected = [c for c in selected if c.name in args.cases]
    for case in selected:
        case.overrides = [*case.overrides, *args.set]
    start = time.perf_counter()
    Worker.log_dir = args.out / "logs"
    probe = Worker([])
    peak = probe.call("peak", args.gpu)["flops_per_s"]
    probe.stop()
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s; {plan}", flush=True)
    results = []
    for case in selected:
        if case.skip:
            print(f"  {case.name}: skipped ({case.skip})", flush=True)
            results.append({"case": case.name, "skipped": case.skip})
            continue
        if case.prepare is not None:
            case.prepare()
        results.append(run_case(case, plan, args.repetitions))
    markdown = table(results, peak, args.gpu)
    record = {
        "command": " ".join(["python", "benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "plan": plan._asdict(),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            # read after the last worker has forked: the parent must not initialise CUDA before that
            "gpu": torch.cuda.get_device_name() if args.gpu else None,
        },
        "matmul_peak_flops_per_s": peak,
        "wall_s": round(time.perf_counter() - start, 1),
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "quick" if args.quick else "bench"
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2))
    (args.out / f"{stem}.md").write_text(f"`{record['command']}`\n\n{markdown}\n")
    print(
        "\n"
        + markdown
        + f"\n\n(wall time {record['wall_s']} s; written to {args.out}/{stem}.json, worker logs in {Worker.log_dir})",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
