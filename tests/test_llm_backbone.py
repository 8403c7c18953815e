"""Decoder LLM backbones: the GGUF conversion cache, layer groups, pooling under left and right padding,
gradient checkpointing, LoRA presets and freezing in a real run (a tiny random Llama), and the embedded SmolLM2."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from finetune_helpers import compose_cfg, make_module, read_probe, tiny_run_overrides
from ftlab.finetuning import FinetunePolicy, PeftAdapter
from ftlab.models.backbones import LLMBackbone, load_causal_lm
from ftlab.models.backbones.contract import Backbone, EmbeddingBackbone, TokenBackbone, can_split
from ftlab.models.backbones.llm import LLAMA_TARGETS, cached_conversion
from ftlab.utils.errors import ConfigError, ModelLoadError

TINY_LLAMA = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> Path:
    """A random 2-block Llama causal LM saved with MiniLM's (embedded) tokenizer: a local model folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ftlab.utils.assets import resolve

    folder = tmp_path_factory.mktemp("tiny_llm")
    tokenizer = AutoTokenizer.from_pretrained(resolve("embedded:all-MiniLM-L6-v2"))
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id, **TINY_LLAMA)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_layer_groups_and_the_llama_lora_preset(tiny_llm):
    backbone = LLMBackbone(str(tiny_llm))
    names = [name for name, _ in backbone.layer_groups()]
    assert names == ["embeddings", "layer.0", "layer.1", "norm"]
    assert backbone.out_features == 32 and backbone.preprocessing.tokenizer == str(tiny_llm)
    assert not hasattr(backbone.model, "lm_head")  # the decoder body only
    assert not can_split(backbone)  # the feature cache's prefix mode falls back to running every step
    assert all(isinstance(backbone, p) for p in (Backbone, TokenBackbone, EmbeddingBackbone))
    module = make_module(
        backbone, FinetunePolicy(peft=PeftAdapter("lora"))
    )  # build_groups: every param grouped
    assert [g.name for g in module.groups] == [*names, "head"]
    trainable = [n for n, p in module.backbone.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # every attention and MLP projection is adapted, not peft's Llama default (q_proj, v_proj)
    assert {n.split(".")[-4] for n in trainable} == set(LLAMA_TARGETS)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_pooling_gives_the_unpadded_features_under_left_and_right_padding(tiny_llm, pooling):
    backbone = LLMBackbone(str(tiny_llm), pooling=pooling).eval()
    texts = [[101, 2023, 3185, 2003, 2307, 102], [101, 6659, 102]]
    with torch.no_grad():
        alone = [
            backbone({"input_ids": torch.tensor([t]), "attention_mask": torch.ones(1, len(t))})[0]
            for t in texts
        ]
        for side in ("left", "right"):
            ids, mask = torch.zeros(2, 6, dtype=torch.long), torch.zeros(2, 6, dtype=torch.long)
            for row, t in enumerate(texts):
                span = slice(6 - len(t), 6) if side == "left" else slice(0, len(t))
                ids[row, span], mask[row, span] = torch.tensor(t), 1
            batch = {"input_ids": ids, "attention_mask": mask}
            features = backbone(batch)
            for row in range(2):
                assert torch.allclose(features[row], alone[row], atol=1e-5), (side, row)
    assert backbone.token_features(batch).shape == (2, 6, 32)


@pytest.mark.parametrize("kind", ["body", "causal_lm"])
def test_gradient_checkpointing_recomputes_blocks_and_gives_the_same_gradients(tiny_llm, kind):
    """For the classifier's decoder body (model=llm) and the whole causal LM (model=smollm2_lm), through the
    current transformers API (the deprecated gradient_checkpointing_enable warns, which fails here)."""
    import warnings

    from ftlab.models.backbones.causal_lm import HFCausalLM

    batch = {"input_ids": torch.tensor([[101, 2023, 3185, 102]]), "attention_mask": torch.ones(1, 4)}
    grads, calls = [], []
    for checkpointing in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            build = LLMBackbone if kind == "body" else HFCausalLM
            backbone = build(str(tiny_llm), gradient_checkpointing=checkpointing).train()
        body = backbone.model if kind == "body" else backbone.model.model
        counter, mlp = [], body.layers[0].mlp
        mlp.forward = lambda x, c=counter, f=mlp.forward: c.append(1) or f(x)  # recomputation skips hooks
        backbone(batch).square().sum().backward()
        grads.append({n: p.grad for n, p in backbone.named_parameters()})
        calls.append(len(counter))
    assert calls == [1, 2]  # checkpointing runs the block again in the backward pass
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6), name


def test_bad_values_fail_clearly(tiny_llm, tmp_path):
    with pytest.raises(ConfigError, match="model.backbone.pooling='cls' is not one of last, mean"):
        LLMBackbone(str(tiny_llm), pooling="cls")
    with pytest.raises(ModelLoadError, match="no GGUF file at"):
        LLMBackbone(str(tmp_path / "missing.gguf"))


def test_conversion_is_cached_by_hash_and_atomic(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"weights v1")
    runs = []

    def convert(source: Path, out: Path) -> None:
        runs.append(source)
        out.mkdir()
        (out / "config.json").write_text("{}")

    def broken(source: Path, out: Path) -> None:
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        cached_conversion(gguf, tmp_path / "cache", broken)
    assert list((tmp_path / "cache" / "llm").iterdir()) == []  # no folder, no temporary left
    first = cached_conversion(gguf, tmp_path / "cache", convert)
    assert first.parent == tmp_path / "cache" / "llm" and (first / "ftlab_source.json").is_file()
    assert cached_conversion(gguf, tmp_path / "cache", convert) == first and len(runs) == 1
    other = cached_conversion(gguf, tmp_path / "other", convert)  # another root: hard links, no second run
    assert (other / "config.json").read_text() == "{}" and len(runs) == 1
    gguf.write_bytes(b"weights v2")  # a changed file is a new key
    assert cached_conversion(gguf, tmp_path / "cache", convert) != first and len(runs) == 2


def test_lora_run_trains_adapters_and_head_only(tiny_llm, tmp_path):
    from ftlab.train import train

    overrides = tiny_run_overrides(tmp_path, tmp_path / "run", tmp_path / "probe")
    overrides = [o for o in overrides if not o.startswith("model=")]
    cfg = compose_cfg(
        [
            "model=llm",
            f"model.backbone.name_or_path={tiny_llm}",
            "finetune=lora",
            "trainer.max_epochs=1",
            *overrides,
        ]
    )
    metrics = train(cfg)
    probe = read_probe(tmp_path / "probe")
    assert metrics["trainable_params"] < metrics["total_params"] / 5
    assert all("lora_" in n or n.startswith("head.") for n in probe["trainable"]["0"])
    # the groups hold base weights and adapters: each one moved (its adapters trained), the head too
    assert all(probe["start"][g] != probe["end"][g] for g in ("layer.0", "layer.1", "head"))
    assert all(probe["start"][g] == probe["end"][g] for g in ("embeddings", "norm"))  # no adapter there


def test_freeze_bottom_run_leaves_frozen_groups_unchanged(tiny_llm, tmp_path):
    from ftlab.train import train

    overrides = [
        o
        for o in tiny_run_overrides(tmp_path, tmp_path / "run", tmp_path / "probe")
        if o != "model=tiny_bert"
    ]
    cfg = compose_cfg(
        [
            "model=llm",
            f"model.backbone.name_or_path={tiny_llm}",
            "finetune=freeze_bottom",  # k=2: embeddings and layer.0
            "trainer.max_epochs=1",
            *overrides,
        ]
    )
    train(cfg)
    probe = read_probe(tmp_path / "probe")
    assert [probe["start"][g] == probe["end"][g] for g in ("embeddings", "layer.0", "layer.1", "norm")] == [
        True,
        True,
        False,
        False,
    ]
    # the run's backbone feeds a later run (model.backbone.checkpoint): trained groups as trained, frozen as loaded
    reloaded = LLMBackbone(str(tiny_llm), checkpoint=str(tmp_path / "run")).state_dict()
    base = LLMBackbone(str(tiny_llm)).state_dict()
    assert base.keys() == reloaded.keys()
    assert not torch.equal(
        base["model.layers.1.mlp.down_proj.weight"], reloaded["model.layers.1.mlp.down_proj.weight"]
    )
    assert torch.equal(
        base["model.layers.0.mlp.down_proj.weight"], reloaded["model.layers.0.mlp.down_proj.weight"]
    )


@pytest.mark.slow
def test_embedded_smollm2_converts_once_and_answers(tmp_path):
    start = time.perf_counter()
    tokenizer, model = load_causal_lm("embedded:smollm2", tmp_path)
    first = time.perf_counter() - start
    folders = list((tmp_path / "llm").iterdir())
    assert len(folders) == 1 and (folders[0] / "model.safetensors").is_file()
    start = time.perf_counter()
    tokenizer, model = load_causal_lm("embedded:smollm2", tmp_path)
    assert time.perf_counter() - start < max(5.0, first / 3)  # from the safetensors folder, not the GGUF file
    assert tokenizer.pad_token is not None and model.dtype == torch.float32
    ids = tokenizer("The capital of Germany is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1] :]).startswith(" Berlin")
    backbone = LLMBackbone("embedded:smollm2", cache_dir=str(tmp_path))
    assert len(backbone.layer_groups()) == 32 and backbone.out_features == 576  # embeddings, 30 blocks, norm
