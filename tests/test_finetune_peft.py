"""PEFT through ``peft`` (LoRA, IA3) and BitFit: trainable counts, frozen base weights, reload, merge."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from finetune_helpers import (
    bert_backbone,
    cnn_backbone,
    compose_cfg,
    image_batch,
    make_module,
    text_batch,
    tiny_run_overrides,
)
from ftlab.finetuning import FinetunePolicy, PeftAdapter, merge_peft
from ftlab.models.module import ClassificationModule
from ftlab.train import train
from ftlab.utils.errors import ConfigError


def head_size(module) -> int:
    return sum(p.numel() for p in module.head.parameters())


@pytest.mark.parametrize("method", ["lora", "ia3"])
@pytest.mark.parametrize("family", ["bert", "cnn"])
def test_peft_trainable_counts_equal_peft_report_plus_head(family, method):
    backbone = bert_backbone() if family == "bert" else cnn_backbone()
    module = make_module(backbone, FinetunePolicy(peft=PeftAdapter(method)))
    peft_trainable, peft_total = module.backbone.model.get_nb_trainable_parameters()
    counts = module.parameter_counts()
    assert peft_trainable > 0
    assert counts["trainable_params"] == peft_trainable + head_size(module)
    assert counts["total_params"] == peft_total + head_size(module)
    assert sum(counts[f"params/{g}/total"] for g in module.group_names) == counts["total_params"]
    # only adapter parameters train in the backbone, and every one of them is in a layer group (build_groups checks)
    names = {n for n, p in module.backbone.named_parameters() if p.requires_grad}
    marker = "lora_" if method == "lora" else "ia3_l"
    assert names and all(marker in n for n in names)
    if family == "bert" and method == "lora":  # peft's default targets for BERT: query and value
        assert {n.split(".")[-4] for n in names} == {"query", "value"}


def test_peft_on_a_backbone_without_model_attribute_fails_clearly():
    class Bare(torch.nn.Module):
        out_features = 4

        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(4, 4)

        def layer_groups(self):
            return [("net", [self.net])]

    with pytest.raises(ConfigError, match="keeps its network as `.model`"):
        make_module(Bare(), FinetunePolicy(peft=PeftAdapter("lora")))


@pytest.mark.parametrize(("family", "method"), [("bert", "lora"), ("cnn", "lora"), ("bert", "ia3")])
def test_merge_peft_gives_the_same_outputs(family, method):
    torch.manual_seed(0)
    module = make_module(
        bert_backbone() if family == "bert" else cnn_backbone(), FinetunePolicy(peft=PeftAdapter(method))
    )
    with torch.no_grad():  # trained-looking adapters (LoRA's B starts at zero, IA3's vectors at one)
        for name, param in module.named_parameters():
            if "lora_B" in name or "ia3_l" in name:
                param.add_(torch.randn_like(param) * 0.1)
    module.eval()
    batch = text_batch() if family == "bert" else image_batch()
    before = module(batch)
    merge_peft(module)
    assert not any("lora_" in n or "ia3_l" in n for n, _ in module.named_parameters())
    assert type(module.backbone.model).__name__ != "PeftModel"
    assert torch.allclose(module(batch), before, atol=1e-5)
    with pytest.raises(ConfigError, match="no peft adapters"):
        merge_peft(module)


def rebuild(cfg, seed: int) -> ClassificationModule:
    """The module as an evaluation entry point builds it from a run's config (here with another seed)."""
    torch.manual_seed(seed)
    backbone = instantiate(cfg.model.backbone)
    head = instantiate(cfg.model.head, in_features=backbone.out_features, num_classes=2)
    return ClassificationModule(
        backbone, head, instantiate(cfg.finetune), optimizer=instantiate(cfg.optimizer), num_classes=2
    )


def loss_and_accuracy(module: ClassificationModule, cfg) -> tuple[float, float]:
    datamodule = instantiate(cfg.data, preprocessing=module.backbone.preprocessing)
    datamodule.setup("fit")
    datamodule.setup("test")
    module.eval()
    losses, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            logits = module(batch)
            losses += float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
            correct, n = correct + int((logits.argmax(-1) == batch["labels"]).sum()), n + len(logits)
    return losses / n, correct / n


@pytest.mark.parametrize("strategy", ["lora", "ia3", "bitfit"])
def test_peft_run_trains_adapters_and_head_and_reloads_with_the_same_predictions(tmp_path, strategy):
    cfg = compose_cfg(
        [*tiny_run_overrides(tmp_path, tmp_path / "run"), f"finetune={strategy}", "trainer.max_epochs=2"]
    )
    metrics = train(cfg)
    initial = rebuild(cfg, seed=cfg.seed)  # as train() built it: the same seeded backbone init
    # counts in metrics.json: peft's own report plus the head (BitFit: the backbone's biases plus the head)
    if strategy == "bitfit":
        expected = sum(p.numel() for n, p in initial.backbone.named_parameters() if n.endswith("bias"))
    else:
        expected = initial.backbone.model.get_nb_trainable_parameters()[0]
    assert metrics["trainable_params"] == expected + head_size(initial)
    assert metrics["total_params"] == sum(p.numel() for p in initial.parameters())
    # fixed base weights are bit-identical after training; adapters (biases) and the head trained
    state = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=False)["state_dict"]
    start = initial.state_dict()
    fixed = [n for n, p in initial.named_parameters() if not p.requires_grad]
    trained = [n for n, p in initial.named_parameters() if p.requires_grad and not n.startswith("head")]
    assert fixed and trained
    assert all(torch.equal(state[n], start[n]) for n in fixed)
    assert any(not torch.equal(state[n], start[n]) for n in trained)
    assert not torch.equal(state["head.layers.1.weight"], start["head.layers.1.weight"])
    # reload: a module rebuilt from the config with another seed (another random head) + best.ckpt predicts as the
    # trained model did in trainer.test (which tested best.ckpt)
    reloaded = rebuild(cfg, seed=123)
    reloaded.load_state_dict(state)
    loss, acc = loss_and_accuracy(reloaded, cfg)
    assert acc == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert loss == pytest.approx(metrics["test/loss"], abs=1e-5)
