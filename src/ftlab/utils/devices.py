"""Settings that depend on the device a run lands on, resolved when it is known.

- ``trainer.precision``: ``trainer=gpu`` asks for ``bf16-mixed``; a CUDA GPU without bf16 (before Ampere: V100, T4)
  gets ``16-mixed`` instead, with a warning, rather than failing or emulating bf16 slowly.
- ``data.pin_memory`` and ``data.num_workers`` (``auto``, the default of the data configs): on a CUDA device,
  page-locked batches (copied to the GPU asynchronously, ``non_blocking``) and a few persistent loader workers that
  prepare the next batches while the GPU computes; on CPU, neither (the main process already uses every core for
  the step, and pinning host memory only costs there). An explicit ``true``/``false`` or number is kept as given.
- ``data.pad_to_multiple_of`` (text, ``auto``): batches padded to a multiple of 8 tokens on a CUDA device, not on CPU.
  On a GPU every new batch shape costs kernel selection the first time it is seen: measured on an H200 (MiniLM,
  bf16, batch 32, 40 length-bucketed batches of Rotten Tomatoes at max length 64), 31 distinct widths took a mean
  221 ms a step on first sight against 26 ms once seen; padded to a multiple of 8 they are 7 widths and the first
  pass took 41 ms a step (24 ms once seen). Multiples of 8 are also the shapes tensor cores want. On CPU there is
  no such first-shape cost to amortise and every padded token is computed, so it stays off.
- Loader workers start with the platform's default start method, named explicitly when the process's own default
  is something else: inside a ``hydra/launcher=parallel`` job (a joblib/loky worker) it is loky's context, whose
  ``Popen`` torch's worker processes cannot go through (``'Process' object has no attribute 'env'``), so every
  sweep over an image folder (``num_workers: 2``) failed there before its first batch.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from typing import Any

import torch

from ftlab.utils.errors import ConfigError

log = logging.getLogger(__name__)

AUTO = "auto"
MAX_AUTO_WORKERS = 4  # per device: tokenised text and in-memory images need little preparation per batch


def _bf16_supported() -> bool:
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch before 2.3 has no including_emulation
        return torch.cuda.get_device_capability()[0] >= 8


def resolve_precision(precision: Any, accelerator: Any) -> Any:
    """``precision`` unchanged, except bf16 on a CUDA GPU that lacks it, which becomes ``16-mixed``."""
    text = str(precision)
    if not text.startswith("bf16") or str(accelerator) not in ("gpu", "cuda", "auto"):
        return precision
    if not torch.cuda.is_available() or _bf16_supported():
        return precision
    log.warning(
        "trainer.precision=%s: this GPU (%s) has no bf16; using 16-mixed (fp16 autocast with a gradient scaler). "
        "Set trainer.precision explicitly to silence this.",
        text,
        torch.cuda.get_device_name(),
    )
    return "16-mixed"


def pad_multiple(setting: Any, cuda: bool) -> int:
    """``data.pad_to_multiple_of`` for a CUDA device or not: ``auto`` is 8 on CUDA and 1 (no rounding) elsewhere."""
    if setting == AUTO:
        return GPU_PAD_MULTIPLE if cuda else 1
    return int(setting or 1)


GPU_PAD_MULTIPLE = 8


def padded_width(longest: int, multiple: int, cap: int | None) -> int:
    """A batch's width: ``longest`` rounded up to ``multiple``, at most ``cap`` (but never below ``longest``)."""
    if multiple <= 1:
        return longest
    return min(-(-longest // multiple) * multiple, cap or longest)


def check_auto_or_count(key: str, value: Any, minimum: int, meaning: str = "") -> None:
    """A clear error unless ``value`` is ``auto`` or a whole number >= ``minimum``."""
    if value != AUTO and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ConfigError(f"{key}={value!r} must be a number >= {minimum}{meaning} or 'auto'.")


def check_loader_settings(num_workers: Any, pin_memory: Any) -> None:
    """A clear error for a value neither ``auto`` nor of the right type."""
    check_auto_or_count("data.num_workers", num_workers, 0)
    if pin_memory != AUTO and not isinstance(pin_memory, bool):
        raise ConfigError(f"data.pin_memory={pin_memory!r} must be true, false or 'auto'.")


def on_cuda(trainer: Any) -> bool:
    """Whether the attached trainer runs on a CUDA device (False with no trainer: outside ``fit``)."""
    if trainer is None:
        return False
    return trainer.strategy.root_device.type == "cuda"


def loader_settings(num_workers: Any, pin_memory: Any, trainer: Any) -> dict[str, Any]:
    """``DataLoader`` keyword arguments with ``auto`` resolved for ``trainer``'s device."""
    cuda = on_cuda(trainer)
    if num_workers == AUTO:
        devices = max(1, getattr(trainer, "num_devices", 1) or 1)
        workers = min(MAX_AUTO_WORKERS, max(1, (os.cpu_count() or 2) // (2 * devices))) if cuda else 0
    else:
        workers = int(num_workers)
    pin = cuda if pin_memory == AUTO else bool(pin_memory)
    settings = {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": pin}
    if workers > 0 and (context := worker_context()) is not None:
        settings["multiprocessing_context"] = context
    return settings


def worker_context() -> Any:
    """The multiprocessing context for ``DataLoader`` workers: ``None`` (torch's default) unless this process's
    default start method is not one of the platform's own, as in a loky worker (a joblib-launched sweep job),
    where it is the platform's default (the first of ``get_all_start_methods``)."""
    method = multiprocessing.get_start_method(allow_none=True)
    platform = multiprocessing.get_all_start_methods()
    if method is None or method in platform:
        return None
    return multiprocessing.get_context(platform[0])


# ``compile=<mode>``: torch.compile's own modes. reduce-overhead records the compiled backbone's kernels as CUDA graphs
# (one launch per graph instead of hundreds a step; a graph per batch shape, so few shapes: widths in multiples of 8).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_backbone(backbone: torch.nn.Module, setting: Any) -> None:
    """``compile``: false (nothing), true (torch.compile's default mode) or one of :data:`COMPILE_MODES`.

    In place (``Module.compile``), so parameter names and checkpoints stay the same."""
    if setting is None or setting is False:
        return
    if setting is not True and setting not in COMPILE_MODES:
        raise ConfigError(
            f"compile={setting!r} is not a setting: use false, true or one of torch.compile's modes "
            f"({', '.join(COMPILE_MODES)}), e.g. compile=reduce-overhead."
        )
    backbone.compile(mode=None if setting is True else str(setting))
