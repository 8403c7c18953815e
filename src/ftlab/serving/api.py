"""``POST /predict``: the request's schema (checked in the HTTP process) and the LitServe API (in the workers).

A request is checked completely before it is queued: LitServe batches decoded requests together, and an error
raised inside a batch would fail every request of that batch. So FastAPI validates the body against
:class:`PredictRequest` in the HTTP process (types, unknown fields, empty or too long lists, base64 and image
decoding), and a bad request gets its 4xx there, without reaching a worker.
"""

# no ``from __future__ import annotations``: LitServe reads decode_request's annotation to give FastAPI the body
# schema, and a string annotation would not be resolved
import base64
import binascii
import io
from dataclasses import dataclass
from typing import Any

import litserve as ls
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ftlab.serving.source import Source


@dataclass
class Rules:
    """What a request may hold for the served run. Set by the server before its HTTP processes fork."""

    modality: str = "text"  # "text" or "image": what the run's data module encodes
    pairs: bool = False  # the run classifies text pairs: every text needs its second text
    max_items: int = 64  # examples per request


RULES = Rules()


def _as_list(value: str | list[str] | None) -> list[str] | None:
    return [value] if isinstance(value, str) else value


def _check_image(index: int, data: str) -> None:
    """Decoded here with the reader training and prediction use, so that no worker meets an unreadable image."""
    from ftlab.data.image_files import ImageReadError, read_image

    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"images[{index}] is not valid base64 ({err})") from None
    try:
        read_image(io.BytesIO(raw))  # type: ignore[arg-type]  # PIL opens file objects as well as paths
    except ImageReadError as err:
        reason = err.__cause__ or err
        raise ValueError(
            f"images[{index}] is not an image that can be read ({type(reason).__name__}: {reason})"
        ) from None


class PredictRequest(BaseModel):
    """``{"inputs": "a text" | ["texts", ...], "pairs": ..., "images": ["<base64>", ...], "top_k": 3}``."""

    model_config = ConfigDict(extra="forbid")

    inputs: str | list[str] | None = None
    pairs: str | list[str] | None = None
    images: list[str] | None = None
    top_k: int | None = Field(default=None, ge=1, le=100)

    @model_validator(mode="after")
    def _fits_the_run(self) -> "PredictRequest":
        field = "images" if RULES.modality == "image" else "inputs"
        other = "inputs" if field == "images" else "images"
        if getattr(self, other) is not None:
            raise ValueError(f"this model takes {RULES.modality}s: send {field}, not {other}")
        items = _as_list(getattr(self, field))
        if items is None:
            raise ValueError(f"{field} is missing: send {field} with one or more {RULES.modality}s")
        if not items:
            raise ValueError(f"{field} is an empty list: send at least one {RULES.modality}")
        if len(items) > RULES.max_items:
            raise ValueError(
                f"{field} holds {len(items)} items, more than this server's limit of {RULES.max_items} a request "
                "(max_items): split the request"
            )
        pairs = _as_list(self.pairs)
        if RULES.pairs and (pairs is None or len(pairs) != len(items)):
            raise ValueError(
                f"this model classifies text pairs: send pairs with one second text per input ({len(items)})"
            )
        if not RULES.pairs and pairs is not None:
            raise ValueError("this model classifies single texts: leave out pairs")
        if field == "images":
            for i, data in enumerate(items):
                _check_image(i, data)
        return self

    def examples(self) -> tuple[list[Any], list[str] | None]:
        """The texts (or image bytes) and the second texts."""
        if self.images is not None:
            return [base64.b64decode(data) for data in self.images], None
        return _as_list(self.inputs) or [], _as_list(self.pairs)


class ServeAPI(ls.LitAPI):
    """Requests in, a batch of them through :class:`ftlab.serving.model.Predictor`, one answer per request out.

    A batch is flattened to one forward pass over all the examples of its requests (each request may hold a
    list), then split back; ``top_k`` is decoded once with the largest asked and cut per request.
    """

    def __init__(
        self, source: Source, device: str, threads: int, top_k: int, max_batch_size: int, max_wait_ms: float
    ):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=max_wait_ms / 1000.0)
        self.source, self.worker_device, self.threads, self.top_k = source, device, threads, top_k

    def setup(self, device: str) -> None:
        from ftlab.serving import metrics
        from ftlab.serving.model import Predictor

        self.predictor = Predictor(self.source, self.worker_device, self.threads)
        self.metrics = metrics.collectors()

    def decode_request(self, request: PredictRequest) -> tuple[list[Any], list[str] | None, int]:
        examples, pairs = request.examples()
        return examples, pairs, request.top_k or self.top_k

    def batch(self, inputs: list[Any]) -> list[Any]:
        return list(inputs)

    def unbatch(self, output: list[Any]) -> list[Any]:
        return output

    def predict(self, requests: Any) -> Any:
        single = self.max_batch_size == 1  # unbatched: LitServe passes one request, not a list
        requests = [requests] if single else requests
        examples = [x for r in requests for x in r[0]]
        pairs = [p for r in requests for p in r[1]] if requests[0][1] is not None else None
        rows = self.predictor.predict(examples, pairs, max(r[2] for r in requests))
        self.metrics["batch_requests"].observe(len(requests))
        self.metrics["batch_items"].observe(len(examples))
        answers, start = [], 0
        for request_examples, _, top_k in requests:
            part = rows[start : start + len(request_examples)]
            start += len(request_examples)
            for row in part:
                if "top_k" in row:
                    row["top_k"] = row["top_k"][:top_k]
            answers.append(part)
        return answers[0] if single else answers

    def encode_response(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {"predictions": rows}
