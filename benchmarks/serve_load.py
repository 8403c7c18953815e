"""Load test of ``ftlab-serve`` on loopback: requests/s and p50/p95/p99 latency at 1, 8 and 32 concurrent clients.

    python benchmarks/serve_load.py --run <run folder> [--onnx <run>/export/onnx] [--int8 <run>/export/int8]
        [--clients 1 8 32] [--requests 400] [--seconds 30] [--out benchmarks/results/<date>_serve]

For each case (PyTorch with dynamic batching, PyTorch without, and ONNX Runtime / int8 exports when given) the
script starts ``python -m ftlab.serving`` on a free port of 127.0.0.1, warms it up, then runs each client count:
every client is an async httpx loop that posts one review per request and waits for its answer. A level stops
after ``--requests`` answers or ``--seconds``, whichever comes first, so the whole test is bounded; the server's
process group is stopped after its case. Resident memory (RSS and PSS) is summed over the server's processes
(HTTP server, inference workers, LitServe's helpers) after each level. Results: ``serve_load.md`` (the table)
and ``serve_load.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

REVIEWS = [
    "a wonderful, moving film with a clever plot",
    "boring and far too long; i checked my watch twice",
    "the performances are superb, but the script never finds its footing",
    "funny and warm",
    "a tedious, lifeless mess that wastes a good cast",
    "smart, tender and true: the best film of the year",
    "nothing works here, not the jokes, not the action, not the romance",
    "beautifully shot and well told, if a little slow in the middle",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: list[str], log: Path, timeout: float = 600) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "ftlab.serving", *args, f"port={port}"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(1)
    stop_server(proc)
    raise RuntimeError(f"the server was not healthy after {timeout} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def group_memory_mb(proc: subprocess.Popen) -> tuple[float, float]:
    """Resident memory of the server's process group (its HTTP and worker processes) in MiB: RSS summed (shared
    pages counted in every process) and PSS summed (shared pages split between them; Linux /proc)."""
    totals = {"Rss:": 0, "Pss:": 0}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid, pgrp, ...
            if int(fields[2]) != proc.pid:
                continue
            for line in (stat.parent / "smaps_rollup").read_text().splitlines():
                if line.split()[0] in totals:
                    totals[line.split()[0]] += int(line.split()[1])
        except (OSError, IndexError, ValueError):  # a process that ended meanwhile
            continue
    return totals["Rss:"] / 1024, totals["Pss:"] / 1024


async def load(url: str, clients: int, requests: int, seconds: float) -> dict[str, float]:
    """``clients`` closed loops posting one review each; stops at ``requests`` answers or ``seconds``."""
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(worker: int, http: httpx.AsyncClient) -> None:
        nonlocal errors
        i = worker
        while len(latencies) + errors < requests and time.perf_counter() < deadline:
            start = time.perf_counter()
            answer = await http.post("/predict", json={"inputs": REVIEWS[i % len(REVIEWS)]})
            if answer.status_code == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1
            i += clients

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(w, http) for w in range(clients)))
        elapsed = time.perf_counter() - start
    ms = np.asarray(latencies) * 1000
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 2),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p95_ms": round(float(np.percentile(ms, 95)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
    }


def cases(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    batching = [f"batching.max_batch_size={args.max_batch_size}", f"batching.max_wait_ms={args.max_wait_ms}"]
    found = [
        ("pytorch, batching", [f"run={args.run}", *batching]),
        ("pytorch, no batching", [f"run={args.run}", "batching.max_batch_size=1"]),
    ]
    if args.onnx:
        found.append(("onnxruntime, batching", [f"export={args.onnx}", *batching]))
    if args.int8:
        found.append(("onnxruntime int8, batching", [f"export={args.int8}", *batching]))
    return found


def markdown(rows: list[dict]) -> str:
    head = (
        "| case | clients | requests/s | p50 ms | p95 ms | p99 ms | requests | errors | RSS MiB | PSS MiB |"
    )
    lines = [head, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['clients']} | {r['requests_per_s']} | {r['p50_ms']} | {r['p95_ms']} | "
            f"{r['p99_ms']} | {r['requests']} | {r['errors']} | {r['rss_mb']} | {r['pss_mb']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="the run folder to serve")
    parser.add_argument("--onnx", help="an ftlab-export format=onnx folder of the run")
    parser.add_argument("--int8", help="an ftlab-export compress=int8 folder of the run")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=400, help="answers per level (at most)")
    parser.add_argument("--seconds", type=float, default=30, help="time per level (at most)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch / ONNX Runtime threads per worker")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results") / f"{time.strftime('%Y-%m-%d')}_serve"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, server_args in cases(args):
        log = args.out / f"server_{name.replace(', ', '_').replace(' ', '_')}.log"
        proc, url = start_server([*server_args, f"threads={args.threads}"], log)
        try:
            asyncio.run(load(url, 4, 16, 30))  # warm-up: first batches, lazy initialisation
            for clients in args.clients:
                row = asyncio.run(load(url, clients, args.requests, args.seconds))
                rss, pss = group_memory_mb(proc)
                rows.append({"case": name, **row, "rss_mb": round(rss), "pss_mb": round(pss)})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            stop_server(proc)
    table = markdown(rows)
    command = "python " + " ".join(sys.argv)
    (args.out / "serve_load.md").write_text(f"{table}\n\nCommand: `{command}`\n")
    (args.out / "serve_load.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    print("\n" + table)


if __name__ == "__main__":
    main()
