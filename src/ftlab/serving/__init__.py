"""``ftlab-serve``: HTTP serving of a run or its ONNX export, with dynamic batching (LitServe); see ``server``."""

from __future__ import annotations

from typing import Any


def serve(cfg: Any) -> None:
    """Serve ``cfg.run`` / ``cfg.export`` (imported on call: the CLI checks the config first)."""
    from ftlab.serving.server import serve as run_server

    run_server(cfg)
