"""Kill tiny training runs with SIGKILL at chosen and random moments, resume each, compare with an uninterrupted run.

    python scripts/fault_injection.py [--random 4] [--cases tokens,metrics] [--out /tmp/faults]

Chosen moments are the named write points of ``ftlab.utils.safe_files.fault_point`` (``FTLAB_FAULT``): inside the
writing of the token cache, the feature cache, ``metrics.json``, ``status.json``, and inside Lightning's checkpoint
saves (``scripts/fault_hooks.py``); ``damaged_last`` also cuts ``last.ckpt`` in half after the kill, so the resume
must fall back to ``best.ckpt``. Random moments: a kill after a random share of the uninterrupted run's wall time.
Every killed run is resumed with its own command plus ``resume=<run folder>``; with ``trainer.deterministic=true``
its final metrics must equal the uninterrupted run's. Prints a JSON summary (kills, recovered, lost).
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
COMPARED = ("test/acc", "test/loss", "best/val/acc", "best_epoch")


def _command(folder: Path, data: Path, cache: Path) -> list[str]:
    return [
        "model=tiny_bert", "finetune=head_only", "data=text_files", f"data.train_file={data}",
        "data.max_length=16", "data.batch_size=8", "trainer.max_epochs=3", "trainer.limit_train_batches=4",
        "trainer.num_sanity_val_steps=0", "trainer.deterministic=true", "trainer.accelerator=cpu",
        "callbacks.early_stopping=null", "callbacks.progress_bar.kind=log", "optimizer.lr=3e-3", "seed=7",
        "+callbacks.fault._target_=fault_hooks.KillAtSave", f"paths.cache_dir={cache}", f"hydra.run.dir={folder}",
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


def _case(name: str, out: Path, data: Path, expected: dict, kill_after: float | None) -> dict:
    folder, cache = out / name, out / f"cache_{name}"
    args = _command(folder, data, cache)
    fault = None if kill_after else ("checkpoint_epoch2_save1" if name == "damaged_last" else name)
    code, log = _run(args, out, fault=fault, kill_after=kill_after)
    killed = code == -9
    if name == "damaged_last" and (folder / "checkpoints/last.ckpt").is_file():
        last = folder / "checkpoints/last.ckpt"
        os.truncate(last, last.stat().st_size // 2)
    if (folder / ".hydra/config.yaml").is_file():
        code, log = _run([*args, f"resume={folder}"], out)
    else:  # killed before Hydra made the run folder: nothing to resume, the same command again
        code, log = _run(args, out)
    metrics = json.loads((folder / "metrics.json").read_text()) if code == 0 else {}
    equal = code == 0 and all(abs(float(metrics[k]) - float(expected[k])) <= 1e-6 for k in COMPARED)
    return {"case": name, "killed": killed, "resumed_exit": code, "equal": equal,
            "fell_back": "trying the previous good checkpoint" in log, "log_tail": "" if equal else log[-1500:]}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/ftlab_faults"))
    parser.add_argument("--cases", default=",".join(CHOSEN))
    parser.add_argument("--random", type=int, default=4, help="kills at random moments")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = _data(out / "reviews.csv")
    start = time.perf_counter()
    if not (
        out / "whole" / "metrics.json"
    ).is_file():  # the uninterrupted run (kept: --out again resumes a study)
        code, log = _run(_command(out / "whole", data, out / "cache_whole"), out)
        assert code == 0, log[-3000:]
        (out / "whole" / "wall_s.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    wall = float((out / "whole" / "wall_s.txt").read_text())
    expected = json.loads((out / "whole" / "metrics.json").read_text())
    rng = random.Random(args.seed)
    plan = [(name, None) for name in args.cases.split(",") if name]
    plan += [(f"random{i}", rng.uniform(0.2, 0.95) * wall) for i in range(args.random)]
    results = []
    for name, after in plan:
        shutil.rmtree(out / name, ignore_errors=True)
        shutil.rmtree(out / f"cache_{name}", ignore_errors=True)
        results.append(_case(name, out, data, expected, after))
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
