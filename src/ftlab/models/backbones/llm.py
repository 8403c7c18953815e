"""Decoder LLMs (Llama-style causal LMs such as SmolLM2) as ftlab backbones, and the loader other code shares.

Public API::

    resolve_llm(name_or_path: str, cache_dir: str | Path | None = None) -> str
        A folder or hub name that ``from_pretrained`` loads: ``embedded:<name>`` (e.g. ``embedded:smollm2``) and
        ``*.gguf`` files are converted once to an fp32 safetensors folder ``<cache_dir>/llm/<stem>-<sha256[:16]>``
        (keyed by the GGUF file's hash, written to a temporary folder and renamed, so two processes never read
        a half-written one); anything else is returned unchanged.
    load_causal_lm(name_or_path: str, cache_dir=None, *, pretrained=True, config_overrides=None, revision=None,
                   trust_remote_code=False) -> tuple[tokenizer, AutoModelForCausalLM]
        The tokenizer (its pad token set to EOS when it has none) and the causal LM in fp32.
    LLMBackbone(name_or_path, pooling="last", ...)
        The decoder body (``AutoModel``: no LM head) pooled to one vector: ``model=smollm2`` / ``model=llm``.

``cache_dir`` ``None`` means ``$FTLAB_CACHE`` or ``~/.cache/ftlab`` (the default of ``paths.cache_dir``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftlab.data.text import TextPreprocessing
from ftlab.models.backbones.checkpoints import load_backbone_checkpoint
from ftlab.utils import assets
from ftlab.utils.errors import ConfigError, ModelLoadError
from ftlab.utils.safe_files import disk_errors, fault_point

log = logging.getLogger(__name__)

POOLING = ("last", "mean")
# Llama-style attention and MLP projections (Llama, Mistral, Qwen2, SmolLM2, ...): LoRA's preset targets
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def default_cache_dir() -> Path:
    """``$FTLAB_CACHE`` or ``~/.cache/ftlab``: the default of ``paths.cache_dir``."""
    return Path(os.environ.get("FTLAB_CACHE") or Path(os.environ.get("HOME", ".")) / ".cache" / "ftlab")


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a changed file is hashed again
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_hash(path: Path) -> str:
    """The sha256 of ``path`` (hashed once per process while the file is unchanged)."""
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` to fp32 with transformers (needs ``gguf``) and ``save_pretrained`` model + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model: Any = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except ImportError as err:
        raise ModelLoadError(
            f"Converting {gguf} needs the `gguf` package: pip install 'ftlab[llm]' (or pip install gguf). {err}"
        ) from err
    # the weights are plain fp32 now: drop the GGUF quantisation record, or save_pretrained refuses
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def cached_conversion(
    gguf: Path, cache_dir: str | Path | None = None, convert: Callable[[Path, Path], None] = convert_gguf
) -> Path:
    """The converted folder of ``gguf`` under ``<cache_dir>/llm``, converting it first if it is not there.

    The folder appears only by an atomic rename of a complete temporary folder: a reader never sees half of one,
    a killed conversion leaves only a ``.*.tmp`` folder (removed by the next conversion of the same file), and
    when two processes convert at once the first rename wins and the other's copy is dropped.
    """
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    digest = file_hash(gguf)
    final = root / "llm" / f"{gguf.stem}-{digest[:16]}"
    if (final / "config.json").is_file():
        _CONVERTED[digest] = final
        return final
    done = _CONVERTED.get(digest)
    if done is not None and (done / "config.json").is_file():  # converted by this process under another root
        convert = _linker(done)
    else:
        log.info("Converting %s to fp32 safetensors once (cached in %s).", gguf.name, final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.*.tmp"):  # left by a killed conversion (any pid)
        if not _alive(stale):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with disk_errors(final.parent):
            convert(gguf, tmp)
            if not (tmp / "ftlab_source.json").exists():  # a linked copy has it (same inode: do not rewrite)
                (tmp / "ftlab_source.json").write_text(
                    json.dumps({"gguf": str(gguf), "sha256": digest}) + "\n"
                )
        fault_point("llm_convert")
        os.rename(tmp, final)  # atomic; fails if another process renamed its copy first
    except OSError:
        if not (final / "config.json").is_file():
            raise
        log.info("Another process converted %s first; using its folder.", gguf.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _CONVERTED[digest] = final
    return final


# sha256 -> a folder this process converted: another cache root gets hard links to it, not a second conversion
_CONVERTED: dict[str, Path] = {}


def _linker(done: Path) -> Callable[[Path, Path], None]:
    def link(_: Path, out: Path) -> None:
        def link_or_copy(src: str, dst: str) -> None:
            try:
                os.link(src, dst)
            except OSError:  # another file system
                shutil.copy2(src, dst)

        shutil.copytree(done, out, copy_function=link_or_copy)

    return link


def _alive(tmp: Path) -> bool:
    """Whether the process that writes ``tmp`` (``.<name>.<pid>.<rand>.tmp``) still runs (then keep its folder)."""
    try:
        os.kill(int(tmp.name.split(".")[-3]), 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def resolve_llm(name_or_path: str, cache_dir: str | Path | None = None) -> str:
    """A loadable folder or hub name for ``name_or_path``: GGUF files (embedded or local) become a cached folder."""
    path = assets.resolve(name_or_path)
    if path.endswith(".gguf"):
        gguf = Path(path).expanduser()
        if not gguf.is_file():
            raise ModelLoadError(f"model.backbone.name_or_path={name_or_path!r}: no GGUF file at {gguf}.")
        return str(cached_conversion(gguf, cache_dir))
    return path


def load_tokenizer_for(path: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The tokenizer of an LLM folder or hub name, with EOS as its pad token when it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked: any id would do
    return tokenizer


def load_causal_lm(
    name_or_path: str,
    cache_dir: str | Path | None = None,
    *,
    pretrained: bool = True,
    config_overrides: dict[str, Any] | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, nn.Module]:
    """The tokenizer and ``AutoModelForCausalLM`` (fp32) of ``name_or_path`` (see :func:`resolve_llm`)."""
    from transformers import AutoModelForCausalLM

    path = resolve_llm(name_or_path, cache_dir)
    model = _load(
        AutoModelForCausalLM, name_or_path, path, pretrained, config_overrides, revision, trust_remote_code
    )
    return load_tokenizer_for(path, revision, trust_remote_code), model


def _load(
    auto: Any,
    name_or_path: str,
    path: str,
    pretrained: bool,
    config_overrides: dict[str, Any] | None,
    revision: str | None,
    trust_remote_code: bool,
) -> Any:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            path, revision=revision, trust_remote_code=trust_remote_code, **(config_overrides or {})
        )
        if not pretrained:
            return auto.from_config(config, trust_remote_code=trust_remote_code)
        return auto.from_pretrained(
            path, config=config, revision=revision, trust_remote_code=trust_remote_code, dtype=torch.float32
        )
    except OSError as err:
        raise ModelLoadError(
            f"model.backbone.name_or_path={name_or_path!r} could not be loaded: {err}. Without internet a hub name "
            "loads only from a warm HF cache: pass a local folder with config.json and weights, a .gguf file, or "
            "use model=smollm2 (embedded)."
        ) from err


def enable_checkpointing(model: Any) -> None:
    """Activation (gradient) checkpointing on an HF model, non-reentrant: it works with frozen inputs (LoRA) and
    needs no extra input gradients. transformers 5 names it ``activation_checkpointing_enable`` (the old name warns
    and goes in v6); 4.x has only ``gradient_checkpointing_enable``."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class LLMBackbone(nn.Module):
    """The decoder body of a causal LM (``AutoModel``, no LM head) pooled to one vector per example.

    Args:
        name_or_path: ``embedded:smollm2``, a ``.gguf`` file, a local folder or a hub name (see :func:`resolve_llm`).
        pooling: ``last`` (the hidden state of the last real token, found from the attention mask, so left and
            right padding give the same features; the only token that has seen the whole text) or ``mean``.
        pretrained: load weights; ``False`` builds the architecture with random weights (tiny test twins).
        config_overrides: changes to the model config (layer count, width, ...).
        gradient_checkpointing: recompute each block's activations in the backward pass (less memory, ~30% slower).
        cache_dir: where converted GGUF files are kept (``${paths.cache_dir}``).
        max_length: the longest input the data side may tokenize (at most the model's positions).
        checkpoint: an earlier ftlab run folder, ``.ckpt`` or ``backbone.pt`` whose backbone weights to load
            (weights only; LoRA adapters of a ``finetune=lora`` run are merged first).
        checkpoint_groups: copy only the bottom n layer groups of ``checkpoint``.
    """

    def __init__(
        self,
        name_or_path: str,
        pooling: str = "last",
        pretrained: bool = True,
        config_overrides: dict[str, Any] | None = None,
        gradient_checkpointing: bool = False,
        cache_dir: str | None = None,
        max_length: int = 2048,
        revision: str | None = None,
        trust_remote_code: bool = False,
        checkpoint: str | None = None,
        checkpoint_groups: int | None = None,
    ):
        super().__init__()
        if pooling not in POOLING:
            raise ConfigError(f"model.backbone.pooling={pooling!r} is not one of {', '.join(POOLING)}.")
        from transformers import AutoModel

        self.name_or_path, self.pooling = name_or_path, pooling
        path = resolve_llm(name_or_path, cache_dir)
        self.model = _load(
            AutoModel, name_or_path, path, pretrained, config_overrides, revision, trust_remote_code
        )
        if gradient_checkpointing:
            enable_checkpointing(self.model)
        config = self.model.config
        self.out_features: int = config.hidden_size
        positions = getattr(config, "max_position_embeddings", None) or max_length
        self.preprocessing = TextPreprocessing(tokenizer=path, max_length=min(int(positions), max_length))
        self.loaded_checkpoint = load_backbone_checkpoint(self, checkpoint, checkpoint_groups)
        # peft's defaults for Llama are q/v only; ftlab adapts every attention and MLP projection it finds
        names = {name.rsplit(".", 1)[-1] for name, _ in self.model.named_modules()}
        self.lora_targets: list[str] | None = [t for t in LLAMA_TARGETS if t in names] or None

    def _blocks(self) -> nn.ModuleList:
        lists = [m for m in self.model.modules() if isinstance(m, nn.ModuleList)]
        if not lists:
            raise ConfigError(
                f"{type(self.model).__name__} has no stack of decoder blocks (an nn.ModuleList)."
            )
        return max(lists, key=len)

    def layer_groups(self) -> list[tuple[str, list[nn.Module]]]:
        """``embeddings``, ``layer.0`` ... ``layer.{n-1}``, ``norm`` (final norm and anything else left over)."""
        # under peft, self.model is a PeftModel: look at the HF model it wraps (same modules, adapters inside)
        body: Any = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        blocks = self._blocks()
        embeddings = body.get_input_embeddings()
        grouped = {id(p) for m in (embeddings, blocks) for p in m.parameters()}
        rest = [
            m
            for m in body.base_model.children()
            if any(True for _ in m.parameters()) and not any(id(p) in grouped for p in m.parameters())
        ]
        # position embeddings (GPT-2's wpe) go with the word embeddings; the final norm forms the top group
        extra = [m for m in rest if isinstance(m, nn.Embedding)]
        norms = [m for m in rest if not isinstance(m, nn.Embedding)]
        groups: list[tuple[str, list[nn.Module]]] = [("embeddings", [embeddings, *extra])]
        groups += [(f"layer.{i}", [block]) for i, block in enumerate(blocks)]
        if norms:
            groups.append(("norm", norms))
        return groups

    def token_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The last layer's hidden states (batch, tokens, hidden); each token has seen only the tokens before it."""
        mask = batch["attention_mask"]
        # positions count real tokens only, so a left-padded row gets the positions of its unpadded self
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, use_cache=False
        )
        return out.last_hidden_state

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled features (batch, hidden) of a batch of ``input_ids`` and ``attention_mask``."""
        hidden = self.token_features(batch)
        mask = batch["attention_mask"]
        if self.pooling == "mean":
            weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        # the last real token: the highest position whose mask is 1 (right padding: length-1; left: T-1)
        steps = torch.arange(mask.shape[1], device=mask.device)
        last = (mask.long() * steps).argmax(-1)  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def input_embeddings(self) -> nn.Module:
        """The word-embedding module (``EmbeddingBackbone``: adversarial training perturbs its output)."""
        return self.model.get_input_embeddings()
