"""Export formats (ONNX, a ``torch.export`` program, a plain HF folder), each verified by running the written file.

Every exporter takes the module (eval mode, adapters merged) and example batches from the run's own data, writes
its file(s) into ``out`` and returns the logits the written artifact computes for those batches; the caller
compares them with the module's logits (:func:`max_abs_diff`). ONNX goes through PyTorch's current exporter
(``torch.onnx.export(dynamo=True)``, which runs ``torch.export``); TorchScript (``torch.jit.trace``) is
deprecated in PyTorch and was replaced by ``format=pt2``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftlab.utils.errors import ConfigError

log = logging.getLogger(__name__)

FORMATS = ("onnx", "pt2", "hf")
REPLACED = {
    "torchscript": "format=torchscript (torch.jit.trace, deprecated in PyTorch) was replaced by format=pt2: a "
    "torch.export program (model.pt2) that torch.export.load('model.pt2').module()(input_ids, attention_mask) runs."
}
# tanh(eps * x) / eps = x - eps^2 x^3 / 3 + ...: with eps = 1e-3 and |x| < 30 the relative error is below 3e-4.
CLS_EPS = 1e-3


class LogitsModel(nn.Module):
    """The module as a function of positional input tensors (names in ``input_names``) -> its logits.

    ``torch.export`` traces functions of tensors; the module itself takes a dict (a batch).
    """

    def __init__(self, module: nn.Module, input_names: list[str]):
        super().__init__()
        self.module, self.input_names = module, list(input_names)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.module(dict(zip(self.input_names, tensors, strict=True)))


def input_names(batch: dict[str, torch.Tensor]) -> list[str]:
    """The model inputs of a batch, in a fixed order (everything but ``labels``)."""
    order = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")
    names = [n for n in order if n in batch] + sorted(k for k in batch if k not in order and k != "labels")
    return names


def dynamic_axes(batch: dict[str, torch.Tensor], names: list[str]) -> tuple[dict[int, str], ...]:
    """Per input: a ``batch`` axis, and a ``sequence`` axis for token inputs (B, T); images keep their size."""
    return tuple({0: "batch", 1: "sequence"} if batch[n].ndim == 2 else {0: "batch"} for n in names)


def max_abs_diff(expected: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    return max(
        float((e.float() - torch.as_tensor(g).float()).abs().max())
        for e, g in zip(expected, got, strict=True)
    )


def _atomically(path: Path, save: Any) -> None:
    """``save(tmp)`` to a temporary name beside ``path`` (same suffix: exporters go by it), then rename: a killed
    export never leaves half a model file under the real name."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        save(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_pt2(module: nn.Module, batch: dict[str, torch.Tensor], path: Path) -> None:
    """``torch.export`` of :class:`LogitsModel` with dynamic batch (and sequence) axes, saved as ``.pt2``."""
    names = input_names(batch)
    # Dim.DYNAMIC lets export bound an axis where the model does (BERT: sequence <= max_position_embeddings)
    shapes = tuple({axis: torch.export.Dim.DYNAMIC for axis in axes} for axes in dynamic_axes(batch, names))
    program = torch.export.export(
        LogitsModel(module, names).eval(),
        tuple(batch[n] for n in names),
        dynamic_shapes={"tensors": shapes},
        strict=False,
    )
    _atomically(path, lambda tmp: torch.export.save(program, tmp))


def export_pt2(module: nn.Module, batches: list[dict[str, torch.Tensor]], out: Path) -> list[torch.Tensor]:
    """``model.pt2``; checked on every batch after ``torch.export.load``."""
    names = input_names(batches[0])
    path = out / "model.pt2"
    save_pt2(module, batches[0], path)
    loaded = torch.export.load(path).module()
    with torch.no_grad():
        return [loaded(*(b[n] for n in names)) for b in batches]


@contextlib.contextmanager
def quiet_loggers(names: tuple[str, ...], level: int = logging.WARNING) -> Iterator[None]:
    """The named loggers (``""``: the root) at ``level`` or above for the duration of the block."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in zip(loggers, levels, strict=True):
            logger.setLevel(old)


def save_onnx(module: nn.Module, batch: dict[str, torch.Tensor], path: Path) -> list[str]:
    """One self-contained ONNX file (weights inside), dynamic ``batch``/``sequence`` axes, output ``logits``;
    returns the input names."""
    names = input_names(batch)
    # the exporter's graph optimizer (onnxscript, onnx_ir) logs every rewrite at INFO: dozens of lines a model
    with warnings.catch_warnings(), quiet_loggers(("onnxscript", "onnx_ir")):
        # named axes shared by several inputs (input_ids, attention_mask): the exporter says it keeps one name each
        warnings.filterwarnings(
            "ignore", message=r"# The axis name: .* will not be used", category=UserWarning
        )
        _atomically(
            path,
            lambda tmp: torch.onnx.export(
                LogitsModel(module, names).eval(),
                tuple(batch[n] for n in names),
                str(tmp),
                input_names=names,
                output_names=["logits"],
                dynamic_shapes={"tensors": dynamic_axes(batch, names)},
                dynamo=True,
                external_data=False,
                verbose=False,
            ),
        )
    return names


def onnx_session(path: Path) -> Any:
    """An onnxruntime CPU session using as many threads as torch does (so latencies compare with torch's)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The session's ``logits`` for a batch (its inputs taken by name)."""
    feed = {i.name: batch[i.name].numpy() for i in session.get_inputs()}
    return torch.from_numpy(session.run(["logits"], feed)[0])


def export_onnx(module: nn.Module, batches: list[dict[str, torch.Tensor]], out: Path) -> list[torch.Tensor]:
    """``model.onnx``; checked with onnxruntime on every batch."""
    path = out / "model.onnx"
    save_onnx(module, batches[0], path)
    session = onnx_session(path)
    return [run_onnx(session, b) for b in batches]


def _hf_classifier_weights(module: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The head's linear layer and, for ``pooling=cls``, a pooler that passes [CLS] through (near-)unchanged.

    BERT's ``*ForSequenceClassification`` computes ``classifier(dropout(tanh(pooler.dense(h_cls))))``. A head on
    ``pooling=pooler`` is exactly that. A head on ``pooling=cls`` is written with ``pooler.dense = eps * I`` and
    ``classifier.weight / eps`` (``tanh`` is linear near 0; the export check bounds the error). Mean pooling
    averages every token, which no standard sequence-classification class does: it is refused.
    """
    backbone, head = module.backbone, module.head
    pooling = getattr(backbone, "pooling", None)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if len(linears) != 1 or any(isinstance(m, nn.GELU | nn.ReLU | nn.Tanh) for m in head.modules()):
        raise ConfigError(
            "format=hf needs a linear head (model.head.hidden_features=null); this run's head has a hidden layer, "
            "which AutoModelForSequenceClassification cannot hold. Export with format=onnx or format=pt2."
        )
    weight, bias = linears[0].weight.detach().clone(), linears[0].bias.detach().clone()
    if pooling == "pooler":
        return weight, bias, {}
    if pooling == "cls":
        hidden = weight.shape[1]
        pooler = {
            "pooler.dense.weight": CLS_EPS * torch.eye(hidden),
            "pooler.dense.bias": torch.zeros(hidden),
        }
        return weight / CLS_EPS, bias, pooler
    raise ConfigError(
        f"format=hf: this run uses model.backbone.pooling={pooling!r}. A standard HF sequence classifier reads "
        "the [CLS] token through its pooler, so mean pooling cannot be written as one without changing the "
        "predictions. Export this run with format=onnx or format=pt2 (they keep mean pooling), or train "
        "with model.backbone.pooling=cls or pooling=pooler for an AutoModelForSequenceClassification folder."
    )


def export_hf(
    module: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    out: Path,
    label_names: list[str] | None,
    max_length: int,
) -> list[torch.Tensor]:
    """A ``save_pretrained`` folder (config with id2label/label2id, weights, tokenizer) for
    ``AutoModelForSequenceClassification``; checked by loading it back with transformers alone."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    backbone = module.backbone
    encoder: Any = getattr(backbone, "model", None)
    if not hasattr(backbone, "preprocessing") or not hasattr(backbone.preprocessing, "tokenizer"):
        raise ConfigError("format=hf exports HF text models; for an image run use format=onnx or format=pt2.")
    weight, bias, pooler = _hf_classifier_weights(module)
    names = label_names or [str(i) for i in range(weight.shape[0])]
    config = encoder.config.__class__.from_dict(encoder.config.to_dict())
    config.num_labels = len(names)
    config.id2label = dict(enumerate(names))
    config.label2id = {n: i for i, n in enumerate(names)}
    config.architectures = None
    model = AutoModelForSequenceClassification.from_config(config)
    base = getattr(model, model.base_model_prefix)
    classifier = getattr(model, "classifier", None)
    if not isinstance(classifier, nn.Linear) or getattr(base, "pooler", None) is None:
        raise ConfigError(
            f"format=hf supports encoders whose sequence classifier is pooler + linear layer (BERT family); "
            f"{type(model).__name__} is built differently. Export with format=onnx or format=pt2."
        )
    state = {**encoder.state_dict(), **pooler}
    missing, unexpected = base.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"format=hf: the encoder's weights do not fit {type(model).__name__}: {missing + unexpected}"
        )
    classifier.weight.data.copy_(weight)
    classifier.bias.data.copy_(bias)
    tokenizer = AutoTokenizer.from_pretrained(backbone.preprocessing.tokenizer)
    tokenizer.model_max_length = max_length  # training truncated here
    # written into a temporary folder, then each file renamed into place (a killed export leaves no half file)
    staging = out / f".hf.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for item in sorted(staging.iterdir()):
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    loaded = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        return [loaded(**{k: v for k, v in b.items() if k != "labels"}).logits for b in batches]


def export(
    fmt: str, module: nn.Module, batches: list[dict[str, torch.Tensor]], out: Path, **hf: Any
) -> list[torch.Tensor]:
    if fmt in REPLACED:
        raise ConfigError(REPLACED[fmt])
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r} is not one of {', '.join(FORMATS)}.")
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "pt2":
        return export_pt2(module, batches, out)
    if fmt == "onnx":
        return export_onnx(module, batches, out)
    return export_hf(module, batches, out, **hf)
