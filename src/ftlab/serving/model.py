"""The model an inference worker holds: the run's data module encodes, a forward runs, the run's task decodes.

With ``run=`` this is :func:`ftlab.predict.predict_rows` itself, so the server answers exactly what
``ftlab-predict`` writes. With ``export=`` the same encoding and decoding surround an ONNX Runtime session.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from ftlab.predict import predict_rows
from ftlab.runs import rebuild
from ftlab.serving.source import Source


class Predictor:
    """Loaded once per inference worker.

    Args:
        source: what to serve (see :mod:`ftlab.serving.source`).
        device: ``cpu`` or ``cuda`` (PyTorch); ONNX Runtime runs on the CPU.
        threads: torch / ONNX Runtime intra-op threads per worker (0: the library's default).
    """

    def __init__(self, source: Source, device: str = "cpu", threads: int = 0):
        if threads:
            torch.set_num_threads(threads)
        self.run = rebuild.load_run(source.run_dir, source.ckpt)
        self.datamodule = rebuild.datamodule_for(self.run, setup=False)
        self.task = self.run.module.task
        self.device = torch.device(device)
        self.session = None
        if source.onnx is not None:
            from ftlab.deploy.formats import onnx_session

            self.session = onnx_session(source.onnx)
            # the ONNX file holds the network: free the backbone's weights, keep the task and the preprocessing
            self.run.module.backbone = torch.nn.Identity()
            self.collate = self.datamodule.collator(cuda=False)
        else:
            self.run.module.to(self.device).eval()

    @property
    def modality(self) -> str:
        return self.datamodule.modality

    def predict(self, examples: list[Any], pairs: list[str] | None, top_k: int) -> list[dict[str, Any]]:
        """One decoded row per example (texts, or image bytes for image runs), in order."""
        if self.modality == "image":
            return self._predict_images(examples, top_k)
        return self._rows(examples, pairs, top_k)

    def _rows(self, examples: list[Any], pairs: list[str] | None, top_k: int) -> list[dict[str, Any]]:
        if self.session is None:
            return predict_rows(self.run, self.datamodule, examples, pairs, len(examples), top_k, self.device)
        from ftlab.deploy.formats import run_onnx

        items = self.datamodule.encode(examples, pairs)
        logits = run_onnx(self.session, self.collate(items))
        return self.task.decode(logits.float(), items, top_k)

    def _predict_images(self, images: list[bytes], top_k: int) -> list[dict[str, Any]]:
        # the data module reads image files (as ftlab-predict does): the bytes go through a file, byte for byte
        with tempfile.TemporaryDirectory(prefix="ftlab-serve-") as tmp:
            paths = []
            for i, data in enumerate(images):
                path = Path(tmp) / f"{i:05d}"
                path.write_bytes(data)
                paths.append(str(path))
            rows = self._rows(paths, None, top_k)
        for i, row in enumerate(rows):
            row["input"] = f"images[{i}]"
        return rows
