"""FSDP for ftlab (``trainer=fsdp``, ``trainer=fsdp_cpu``): Lightning's ``FSDPStrategy`` with the layer groups as
its wrap units, CPU ranks (gloo), norm clipping, and reading a sharded checkpoint back as one weights-only dict.

- **Wrap units**: every module of the backbone's ``layer_groups()`` (embeddings, each transformer block, ...) is
  its own FSDP unit, unless ``auto_wrap_policy`` is given. The units are the fine-tuning policy's groups, so a
  group frozen for the whole run (``head_only``, ``freeze_bottom``) is a unit whose parameters all have
  ``requires_grad=False``; ``use_orig_params=True`` (Lightning's default) keeps the original parameters, so the
  optimizer's named groups and LR multipliers and PEFT's mixed frozen/trainable blocks work unchanged.
- **CPU**: Lightning 2.6 refuses ``FSDPStrategy`` without a GPU, and passes ``device_id=None`` on CPU, for which
  torch's FSDP raises "FSDP needs a non-CPU accelerator device". Torch's FSDP does run on CPU with gloo when given
  ``device_id=torch.device("cpu")``, which this strategy passes (Lightning's refusal tests the exact class).
- **Clipping**: Lightning's ``FSDPPrecision`` refuses norm clipping (``torch.nn.utils.clip_grad_norm_`` over
  shards is wrong); here it calls the root FSDP module's ``clip_grad_norm_``, which reduces over all shards.
- **Checkpoints**: with ``state_dict_type: sharded`` a checkpoint is a folder (torch.distributed.checkpoint files
  plus Lightning's ``meta.pt``). :func:`read_sharded_checkpoint` consolidates it without running pickled code.
"""

from __future__ import annotations

import io
import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.precision.fsdp import FSDPPrecision
from pytorch_lightning.strategies import FSDPStrategy
from pytorch_lightning.strategies.fsdp import _move_torchmetrics_to_device, _setup_activation_checkpointing
from torch import nn

from ftlab.utils.errors import ConfigError, ModelLoadError

log = logging.getLogger("ftlab.fsdp")
META_FILE = "meta.pt"  # Lightning's non-tensor part of a sharded checkpoint (epoch, loops, hyper-parameters)


class ClippingFSDPPrecision(FSDPPrecision):
    """``FSDPPrecision`` whose norm clipping goes through the root FSDP module (set by the strategy)."""

    root: Any = None

    def clip_grad_by_norm(self, optimizer: Any, clip_val: int | float) -> None:
        self.root.clip_grad_norm_(clip_val)


class LayerGroupFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` with the backbone's layer groups as wrap units, on GPUs or CPU ranks.

    Args: those of ``pytorch_lightning.strategies.FSDPStrategy`` (``state_dict_type``, ``sharding_strategy``,
    ``cpu_offload``, ``activation_checkpointing_policy``, ...). ``auto_wrap_policy`` replaces the layer groups.
    """

    strategy_name = "fsdp_layer_groups"

    @property
    def precision_plugin(self) -> FSDPPrecision:
        return super().precision_plugin

    @precision_plugin.setter
    def precision_plugin(self, plugin: Any) -> None:
        if isinstance(plugin, FSDPPrecision) and not isinstance(plugin, ClippingFSDPPrecision):
            plugin = ClippingFSDPPrecision(plugin.precision, plugin.scaler)  # type: ignore[arg-type]
        FSDPStrategy.precision_plugin.fset(self, plugin)  # type: ignore[attr-defined]

    def _configure_launcher(self) -> None:
        from ftlab.runs.jobs import is_multirun

        assert self.cluster_environment is not None
        if is_multirun() and not self.cluster_environment.creates_processes_externally:
            raise ConfigError(
                "trainer.strategy=FSDP inside a multirun (-m) on one machine is not supported: Lightning's FSDP "
                "re-runs the script once per rank, and every rank would start its own sweep. Run the jobs one at "
                "a time (without -m), or under hydra/launcher=slurm where each rank is a SLURM task."
            )
        super()._configure_launcher()

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        root = getattr(self, "_root", None)
        if root is not None and root.module is model:
            # test() after fit(): Lightning hands over the bare LightningModule again, whose inner units are still
            # wrapped; wrapping it again would skip the root (the head's shard) and break its state dict
            return root
        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return super()._setup_model(model)  # wrapped by the user
        kwargs = dict(self.kwargs)
        if "auto_wrap_policy" not in kwargs:
            kwargs["auto_wrap_policy"] = layer_group_policy(model)
        device = self.root_device
        wrapped = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=device if device.type == "cpu" else device.index,  # Lightning's None fails on CPU
            **kwargs,
        )
        _move_torchmetrics_to_device(wrapped, device)
        _setup_activation_checkpointing(wrapped, self._activation_checkpointing_kwargs)
        self._root = wrapped
        if isinstance(self.precision_plugin, ClippingFSDPPrecision):
            self.precision_plugin.root = wrapped
        units = wrapped_classes(wrapped)
        log.info("FSDP units: %s", ", ".join(f"{n} x{units.count(n)}" for n in dict.fromkeys(units)))
        return wrapped


def layer_group_policy(model: nn.Module) -> Any:
    """An FSDP wrap policy with each module of the backbone's layer groups as a unit (none for a model without)."""
    from torch.distributed.fsdp.wrap import CustomPolicy

    from ftlab.finetuning.groups import backbone_groups

    backbone = getattr(model, "backbone", None)
    groups = backbone_groups(backbone) if backbone is not None else []
    units = {id(m) for _, modules in groups for m in modules}
    return CustomPolicy(lambda module: id(module) in units)


def wrapped_classes(model: nn.Module) -> list[str]:
    """The class names of the FSDP units inside ``model`` (for logs and tests)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return [type(m.module).__name__ for m in model.modules() if isinstance(m, FullyShardedDataParallel)]


def full_state_dict(strategy: Any, module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s whole state dict; under FSDP gathered from every rank onto rank 0 (call it on every rank;
    the other ranks get an empty dict)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = getattr(strategy, "model", None)
    if not isinstance(strategy, FSDPStrategy) or not isinstance(model, FullyShardedDataParallel):
        return module.state_dict()
    from lightning_fabric.strategies.fsdp import _get_full_state_dict_context

    context: Any = _get_full_state_dict_context(model, world_size=strategy.world_size)  # typed as a generator
    with context:
        return model.state_dict()


# --- reading a sharded checkpoint ---------------------------------------------------------------------------------
_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)
# what torch 2.14 writes into .metadata besides its dataclasses: a layout by name (torch's own weights-only
# unpickler allows the same function), the checkpoint's path, plain containers
_PLAIN_GLOBALS = {
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles torch.distributed.checkpoint's ``.metadata`` (dataclasses of sizes, dtypes, offsets) and nothing
    else: any other global (a function, a class from elsewhere) is refused, so no pickled code runs."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint."):
            found = super().find_class(module, name)
            if isinstance(found, type):
                return found
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), _TORCH_VALUES)):
            return super().find_class(module, name)
        if (module, name) in _PLAIN_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is forbidden in a checkpoint's .metadata")


def _reader(path: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            with open(Path(self.path) / ".metadata", "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def _planner() -> Any:
    # the planner that builds the whole state dict from the metadata (what dcp_to_torch_save uses), except that
    # non-tensor values (optimizer steps, param-group settings) load with weights_only=True
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner

    class WeightsOnlyPlanner(_EmptyStateDictLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)

    return WeightsOnlyPlanner()


def read_sharded_checkpoint(path: Path) -> dict[str, Any]:
    """A sharded FSDP checkpoint folder as one Lightning-style checkpoint dict (``state_dict`` with full tensors,
    plus ``meta.pt``'s entries), read in this process without a process group and without running pickled code."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    if not (path / ".metadata").is_file() or not (path / META_FILE).is_file():
        raise ModelLoadError(
            f"{path} is a folder but not a sharded FSDP checkpoint (it lacks .metadata or {META_FILE})."
        )
    from torch.distributed.checkpoint.api import CheckpointException

    state: dict[str, Any] = {}
    reader = _reader(path)
    try:
        reader.read_metadata()  # first, so a refused global surfaces as itself (dcp would wrap it)
        _load_state_dict(state, storage_reader=reader, planner=_planner(), no_dist=True)
        meta = torch.load(path / META_FILE, map_location="cpu", weights_only=True)
    except CheckpointException as err:  # dcp's wrapper around what failed while reading
        failures = [exc for exc, _ in err.failures.values()]
        refused = [exc for exc in failures if isinstance(exc, pickle.UnpicklingError)]
        if refused:
            raise refused[0] from None
        raise ModelLoadError(f"{path} could not be read as a sharded FSDP checkpoint: {failures}") from None
    except (OSError, RuntimeError, EOFError, KeyError, ValueError, AttributeError) as err:
        raise ModelLoadError(f"{path} could not be read as a sharded FSDP checkpoint: {err}") from err
    if "model" not in state:
        raise ModelLoadError(f"{path} is a sharded checkpoint without model weights (no 'model' entry).")
    return {**meta, "state_dict": state["model"]}
