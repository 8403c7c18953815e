"""Prometheus metrics of ``ftlab-serve``, shared by its processes (prometheus_client's multiprocess mode).

LitServe runs HTTP servers and inference workers as separate processes: requests and latencies are counted where
HTTP is answered, batch sizes where the model runs. Each process writes its values into files under
``PROMETHEUS_MULTIPROC_DIR`` and ``GET /metrics`` adds them up. The variable must be set before
``prometheus_client`` is imported, so the server sets it (:func:`use_dir`) before anything imports this module's
collectors, and the workers inherit it.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any

ENV = "PROMETHEUS_MULTIPROC_DIR"
ENDPOINTS = ("/predict", "/health", "/metadata", "/metrics", "/")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def use_dir(path: Path) -> None:
    """Point prometheus_client's multiprocess mode at an empty ``path`` (before it is imported)."""
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.db"):
        old.unlink()
    os.environ[ENV] = str(path)


@functools.cache
def collectors() -> dict[str, Any]:
    from prometheus_client import Counter, Histogram

    return {
        "requests": Counter(
            "ftlab_serve_requests", "HTTP requests by endpoint and status", ["endpoint", "status"]
        ),
        "latency": Histogram(
            "ftlab_serve_request_seconds", "Request latency in seconds", ["endpoint"], buckets=LATENCY_BUCKETS
        ),
        "batch_requests": Histogram(
            "ftlab_serve_batch_requests", "Requests per model batch (dynamic batching)", buckets=SIZE_BUCKETS
        ),
        "batch_items": Histogram(
            "ftlab_serve_batch_items", "Examples per model batch (all requests' inputs)", buckets=SIZE_BUCKETS
        ),
    }


def exposition() -> tuple[bytes, str]:
    """All processes' metrics in the Prometheus text format, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST


class HTTPMetrics:
    """ASGI middleware: counts and times every request, and answers 413 to a body over ``max_body`` bytes
    before reading it (LitServe's ``max_payload_size`` also stops a body sent without a Content-Length)."""

    def __init__(self, app: Any, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), {"code": 500}

        async def send_recording(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                await _too_large(send_recording, int(length), self.max_body)
            else:
                await self.app(scope, receive, send_recording)
        finally:
            endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
            found = collectors()
            found["requests"].labels(endpoint, str(status["code"])).inc()
            found["latency"].labels(endpoint).observe(time.perf_counter() - start)


async def _too_large(send: Any, length: int, limit: int) -> None:
    import json

    body = json.dumps(
        {"error": f"the request body is {length} bytes, over this server's limit of {limit} (max_body_mb)"}
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
