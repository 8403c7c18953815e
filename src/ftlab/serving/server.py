"""``ftlab-serve``: a run (PyTorch) or its ONNX export (ONNX Runtime) behind HTTP, with LitServe.

    ftlab-serve run=<run folder>                            # http://127.0.0.1:8000
    ftlab-serve export=<run>/export/onnx port=9000          # the exported ONNX file through ONNX Runtime
    ftlab-serve run=<run folder> batching.max_batch_size=1  # no dynamic batching
    ftlab-serve run=<run folder> workers=2 host=0.0.0.0     # two model processes, reachable from other hosts

Endpoints: ``POST /predict``, ``GET /health``, ``GET /metadata``, ``GET /metrics`` (Prometheus), ``GET /`` (a page
to try the model). See docs/serving.md.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ftlab.runs import folder
from ftlab.serving import metrics
from ftlab.serving.api import RULES, ServeAPI
from ftlab.serving.source import Source, metadata, resolve
from ftlab.utils.errors import ConfigError
from ftlab.utils.extras import require_extra

HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServe binds to


def check(cfg: DictConfig) -> None:
    """The serving settings' ranges, before any process starts."""
    limits = {
        "port": (1024, 65535),
        "workers": (1, 64),
        "batching.max_batch_size": (1, 4096),
        "max_items": (1, 100_000),
        "top_k": (1, 100),
    }
    for key, (low, high) in limits.items():
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"{key}={value!r} must be a whole number from {low} to {high}.")
    if str(cfg.host) not in HOSTS:
        raise ConfigError(
            f"host={cfg.host}: use 127.0.0.1 (this machine only), 0.0.0.0 or :: (all interfaces)."
        )
    for key in ("batching.max_wait_ms", "max_body_mb", "timeout_s"):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{key}={value!r} must be a positive number.")


def _error(status: int, message: str) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


FIELD_TYPES = {
    "inputs": "a text or a list of texts",
    "pairs": "a text or a list of texts",
    "images": "a list of base64 strings",
    "top_k": "a whole number from 1 to 100",
}
EXAMPLE = '{"inputs": "a text"}'


def _validation_message(errors: list[dict[str, Any]]) -> tuple[int, str]:
    """FastAPI's validation errors as (status, one line): 400 for a body that is not JSON, else 422."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return 400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})"
    parts = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "extra_forbidden":
            parts.append(f"unknown field {loc[0]!r}: the fields are {', '.join(FIELD_TYPES)}")
        elif not loc:  # the body itself: missing, or JSON that is not an object
            msg = str(err["msg"]).removeprefix("Value error, ")
            shape = err.get("type") in ("missing", "model_attributes_type", "dict_type", "model_type")
            parts.append(f"the body must be a JSON object such as {EXAMPLE}" if shape else msg)
        elif loc[0] in FIELD_TYPES and err.get("type") not in ("greater_than_equal", "less_than_equal"):
            index = next((p for p in loc[1:] if p.isdigit()), None)  # an item of the list branch
            if index is not None:
                parts = [p for p in parts if not p.startswith(f"{loc[0]} must")]
                parts.append(f"{loc[0]}[{index}] must be a string, not {type(err.get('input')).__name__}")
            elif not any(p.startswith(f"{loc[0]}[") for p in parts):
                parts.append(f"{loc[0]} must be {FIELD_TYPES[loc[0]]}, not {type(err.get('input')).__name__}")
        else:
            parts.append(f"{'.'.join(loc)}: {err['msg']}")
    return 422, "; ".join(dict.fromkeys(parts))


def _add_routes(server: Any, info: dict[str, Any]) -> None:
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException

    from ftlab.serving.page import page

    app = server.app

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Any:
        return _error(*_validation_message(list(exc.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Any:
        return _error(exc.status_code, str(exc.detail))

    # LitServe's own "/" answers a plain text; the page replaces it
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != "/"]
    html = page(info)
    app.add_api_route("/", lambda: HTMLResponse(html), methods=["GET"], include_in_schema=False)
    app.add_api_route("/metadata", lambda: JSONResponse(info), methods=["GET"])

    def prometheus() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    app.add_api_route("/metrics", prometheus, methods=["GET"])


def build(cfg: DictConfig, source: Source) -> Any:
    """The LitServer for ``cfg`` (not started): routes, limits, batching, workers."""
    import litserve as ls
    from hydra.utils import get_class

    run_cfg = OmegaConf.load(source.run_dir / folder.CONFIG_FILE)
    assert isinstance(run_cfg, DictConfig)
    RULES.modality = getattr(get_class(run_cfg.data._target_), "modality", "text")
    RULES.pairs = bool(run_cfg.data.get("text_pair_column"))
    RULES.max_items = int(cfg.max_items)
    batch = int(cfg.batching.max_batch_size)
    api = ServeAPI(
        source, str(cfg.device), int(cfg.threads), int(cfg.top_k), batch, float(cfg.batching.max_wait_ms)
    )
    max_body = int(float(cfg.max_body_mb) * 2**20)
    info = {
        **metadata(source, run_cfg),
        "input": {"field": "images" if RULES.modality == "image" else "inputs", "pairs": RULES.pairs},
        "serving": {
            "max_batch_size": batch,
            "max_wait_ms": float(cfg.batching.max_wait_ms),
            "workers": int(cfg.workers),
            "max_items": RULES.max_items,
            "max_body_bytes": max_body,
        },
    }
    server = ls.LitServer(
        api,
        accelerator="cuda" if cfg.device == "cuda" else "cpu",
        devices=1,
        workers_per_device=int(cfg.workers),
        timeout=float(cfg.timeout_s),
        max_payload_size=max_body,
        middlewares=[(metrics.HTTPMetrics, {"max_body": max_body})],
        model_metadata={"task": info["task"], "runtime": info["runtime"]},
    )
    _add_routes(server, info)
    return server


def serve(cfg: DictConfig) -> None:
    """Start the server for ``cfg`` and serve until stopped (Ctrl+C)."""
    require_extra("serve", "litserve", "prometheus_client", feature="ftlab-serve")
    check(cfg)
    source = resolve(cfg)
    if source.onnx is not None:
        require_extra("onnx", "onnxruntime", feature="ftlab-serve export=")
    with tempfile.TemporaryDirectory(prefix="ftlab-serve-metrics-") as tmp:
        metrics.use_dir(Path(tmp))
        server = build(cfg, source)
        print(
            f"\nftlab serve: {source.run_dir} ({source.runtime}) on http://{cfg.host}:{cfg.port}  "
            f"max_batch_size={cfg.batching.max_batch_size} max_wait_ms={cfg.batching.max_wait_ms} "
            f"workers={cfg.workers}\n",
            flush=True,
        )
        server.run(
            host=str(cfg.host),
            port=int(cfg.port),
            num_api_servers=int(cfg.api_servers),
            log_level=str(cfg.log_level),
            generate_client_file=False,
        )


def main() -> None:
    """``python -m ftlab.serving``, the same as ``ftlab-serve``."""
    from ftlab import cli

    cli.serve()
