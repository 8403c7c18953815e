"""Kill tiny training runs with SIGKILL at chosen and random moments, resume each, compare with an uninterrupted run.

    python scripts/fault_injection.py [--random 4] [--cases tokens,metrics] [--out /tmp/faults]
    python scripts/fault_injection.py --sweep [--cases 'checkpoint_epoch1_save1#2,status#1'] [--random 2]

Chosen moments are the named write points of ``ftlab.utils.safe_files.fault_point`` (``FTLAB_FAULT``): inside the
writing of the token cache, the feature cache, ``metrics.json``, ``status.json``, and inside Lightning's checkpoint
saves (``scripts/fault_hooks.py``); ``damaged_last`` also cuts ``last.ckpt`` in half after the kill, so the resume
must fall back to ``best.ckpt``. Random moments: a kill after a random share of the uninterrupted run's wall time.
Every killed run is resumed with its own command plus ``resume=<run folder>``; with ``trainer.deterministic=true``
its final metrics must equal the uninterrupted run's. Prints a JSON summary (kills, recovered, lost).

``--sweep``: the same with a two-job sweep (``-m optimizer.lr=3e-3,2e-3``, the basic launcher: both jobs in one
process); a case ``<point>#<n>`` kills at the n-th time the process reaches that point (``#2``: in the second job
for a point each job reaches once), and every killed sweep is resumed with its own command plus
``resume=<sweep folder>``: every job must complete with the uninterrupted sweep's final metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# checkpoint_epoch<E>_save<N>: epoch 0 saves best.ckpt then last.ckpt (save2: best written, last not); later epochs
# of the study's run do not improve, so they save last.ckpt alone (save1)
CHOSEN = ["tokens", "features", "checkpoint_epoch0_save1", "checkpoint_epoch0_save2", "checkpoint_epoch1_save1",
          "damaged_last", "metrics", "status"]  # fmt: skip
# in a sweep: job 1 killed while saving a checkpoint mid-training (job 0 done), job 0 killed between best.ckpt and
# last.ckpt, job 1's last.ckpt cut off after a kill, job 1 killed writing metrics.json, job 0 writing status.json
SWEEP_CHOSEN = ["checkpoint_epoch1_save1#2", "checkpoint_epoch0_save2#1", "damaged_last", "metrics#2", "status#1",
                "features#1"]  # fmt: skip
COMPARED = ("test/acc", "test/loss", "best/val/acc", "best_epoch")
SWEEP_LRS = ("3e-3", "2e-3")


def _command(folder: Path, data: Path, cache: Path, sweep: bool = False) -> list[str]:
    where = [f"hydra.sweep.dir={folder}", "-m"] if sweep else [f"hydra.run.dir={folder}"]
    lr = f"optimizer.lr={','.join(SWEEP_LRS)}" if sweep else "optimizer.lr=3e-3"
    return [
        "model=tiny_bert", "finetune=head_only", "data=text_files", f"data.train_file={data}",
        "data.max_length=16", "data.batch_size=8", "trainer.max_epochs=3", "trainer.limit_train_batches=4",
        "trainer.num_sanity_val_steps=0", "trainer.deterministic=true", "trainer.accelerator=cpu",
        "callbacks.early_stopping=null", "callbacks.progress_bar.kind=log", lr, "seed=7",
        "+callbacks.fault._target_=fault_hooks.KillAtSave", f"paths.cache_dir={cache}", *where,
    ]  # fmt: skip


def _run(
    args: list[str], cwd: Path, fault: str | None = None, kill_after: float | None = None
) -> tuple[int, str]:
    env = {
        **os.environ,
        "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("FTLAB_FAULT", None)
    if fault:
        env["FTLAB_FAULT"] = fault
    proc = subprocess.Popen([sys.executable, "-m", "ftlab.train", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.kill()  # SIGKILL
        out, _ = proc.communicate()
    return proc.returncode, out


def _data(path: Path) -> Path:
    good = [
        "a wonderful moving film",
        "great acting and a clever plot",
        "funny and warm",
        "superb and gripping",
    ]
    bad = ["a dull lifeless mess", "boring and far too long", "badly acted and flat", "nothing works here"]
    rows = [
        f'"{text} #{i}",{label}'
        for i in range(40)
        for text, label in ((good[i % 4], "pos"), (bad[i % 4], "neg"))
    ]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return path


def _jobs(folder: Path, sweep: bool) -> list[Path]:
    return [folder / str(i) for i in range(len(SWEEP_LRS))] if sweep else [folder]


def _finals(folder: Path, sweep: bool) -> list[dict]:
    """Each job's final metrics (``{}`` for a job without its ``metrics.json``)."""
    return [
        json.loads(p.read_text()) if (p := job / "metrics.json").is_file() else {}
        for job in _jobs(folder, sweep)
    ]


def _case(
    name: str, out: Path, data: Path, expected: list[dict], kill_after: float | None, sweep: bool
) -> dict:
    folder = out / (f"sweep_{name.replace('#', '_n')}" if sweep else name)
    cache = folder.with_name(f"cache_{folder.name}")
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    args = _command(folder, data, cache, sweep)
    damaged = "checkpoint_epoch2_save1" + ("#2" if sweep else "")  # the last epoch (of the second job)
    fault = None if kill_after else (damaged if name == "damaged_last" else name)
    code, log = _run(args, out, fault=fault, kill_after=kill_after)
    killed = code == -9
    done = sum((job / "status.json").is_file() for job in _jobs(folder, sweep))  # jobs complete at the kill
    last = _jobs(folder, sweep)[-1] / "checkpoints/last.ckpt"
    if name == "damaged_last" and last.is_file():
        os.truncate(last, last.stat().st_size // 2)
    record = folder / ("multirun.yaml" if sweep else ".hydra/config.yaml")
    # the same command plus resume=; killed before Hydra made the folder: nothing to resume, the same command again
    code, log = _run([*args, f"resume={folder}"] if record.is_file() else args, out)
    finals = _finals(folder, sweep) if code == 0 else []
    equal = len(finals) == len(expected) and all(
        k in got and abs(float(got[k]) - float(want[k])) <= 1e-6
        for got, want in zip(finals, expected, strict=True)
        for k in COMPARED
    )
    return {"case": name, "sweep": sweep, "killed": killed, "jobs_done_at_kill": done, "resumed_exit": code,
            "equal": equal, "fell_back": "trying the previous good checkpoint" in log, "log_tail": "" if equal else log[-1500:]}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/ftlab_faults"))
    parser.add_argument("--sweep", action="store_true", help="kill and resume a two-job sweep")
    parser.add_argument("--cases", default=None, help="write points (default: all of the mode's)")
    parser.add_argument("--random", type=int, default=4, help="kills at random moments")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = _data(out / "reviews.csv")
    whole = out / ("whole_sweep" if args.sweep else "whole")
    if not (whole / "wall_s.txt").is_file():  # the uninterrupted run (kept: --out again reuses it)
        start = time.perf_counter()
        code, log = _run(_command(whole, data, out / f"cache_{whole.name}", args.sweep), out)
        assert code == 0, log[-3000:]
        (whole / "wall_s.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    wall = float((whole / "wall_s.txt").read_text())
    expected = _finals(whole, args.sweep)
    rng = random.Random(args.seed)
    cases = ",".join(SWEEP_CHOSEN if args.sweep else CHOSEN) if args.cases is None else args.cases
    plan = [(name, None) for name in cases.split(",") if name]
    plan += [(f"random{i}", rng.uniform(0.2, 0.95) * wall) for i in range(args.random)]
    results = []
    for name, after in plan:
        results.append(_case(name, out, data, expected, after, args.sweep))
        with open(out / "results.jsonl", "a") as f:  # as they finish: a long study can be read while it runs
            f.write(json.dumps({k: v for k, v in results[-1].items() if k != "log_tail"}) + "\n")
    summary = {
        "kills": sum(r["killed"] for r in results),
        "recovered": sum(r["killed"] and r["equal"] for r in results),
        "lost": sum(r["killed"] and not r["equal"] for r in results),
        "not_killed": [r["case"] for r in results if not r["killed"]],
        "uninterrupted_wall_s": round(wall, 1),
        "cases": results,
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
