"""Masked-LM adaptation (task=masked_lm): masking, the tied head, perplexity, freeze policies and LoRA, unlabelled
sources, and the adapted backbone loaded by a later run (model.backbone.checkpoint)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ftlab.data import TextClassificationDataModule, TextPreprocessing
from ftlab.data.masking import MaskedTextDataModule
from ftlab.models.backbones import HFTextBackbone
from ftlab.runs.rebuild import build_module, datamodule_for, load_run
from ftlab.tasks.base import IGNORE_INDEX
from ftlab.utils import assets
from ftlab.utils.errors import ConfigError, DataError, DataFileError

from conftest import compose_cfg, tiny_reviews

MINILM = assets.resolve("embedded:all-MiniLM-L6-v2")
WORDS = [
    "unbelievably",
    "extraordinary",
    "cinematography",
    "overwhelmingly",
    "heartbreaking",
    "screenplay",
    "the",
    "a",
    "film",
]


def texts_csv(path: Path, n: int = 300, seed: int = 0) -> Path:
    """Unlabelled texts of ~12 words (many split into several WordPiece tokens): a single ``text`` column."""
    rng = np.random.default_rng(seed)
    pd.DataFrame({"text": [" ".join(rng.choice(WORDS, 12)) for _ in range(n)]}).to_csv(path, index=False)
    return path


def masked_data(csv: Path, **kwargs) -> MaskedTextDataModule:
    datamodule = TextClassificationDataModule(
        preprocessing=TextPreprocessing(MINILM, 128),
        source="files",
        train_file=str(csv),
        task="masked_lm",
        max_length=48,
        batch_size=16,
        seed=3,
        **kwargs,
    )
    datamodule.setup("fit")
    return datamodule


def collate(datamodule, split: str, keys) -> dict[str, torch.Tensor]:
    dataset = datamodule.datasets[split]
    return datamodule.collator(cuda=False)([dataset[k] for k in keys])


def test_masking_is_bert_style_and_a_function_of_seed_split_epoch_index(tmp_path):
    datamodule = masked_data(texts_csv(tmp_path / "texts.csv"))
    assert isinstance(datamodule, MaskedTextDataModule) and datamodule.task == "masked_lm"
    train = datamodule.datasets["train"]
    n = len(train)
    batch = collate(datamodule, "train", range(n))
    original = collate(datamodule, "train", range(n))  # the same keys: the same masks
    assert torch.equal(batch["input_ids"], original["input_ids"])
    ids = np.full(batch["input_ids"].shape, 0)
    for row in range(n):
        item = train[row]["input_ids"]
        ids[row, : len(item)] = item
    labels, inputs = batch["labels"].numpy(), batch["input_ids"].numpy()
    tokenizer = datamodule.tokenizer
    special = np.isin(ids, tokenizer.all_special_ids)
    chosen = labels != IGNORE_INDEX
    assert not (chosen & special).any()
    assert (labels[chosen] == ids[chosen]).all()  # labels are the original tokens
    assert abs(chosen.sum() / (~special).sum() - 0.15) < 0.02
    as_mask = (inputs[chosen] == tokenizer.mask_token_id).mean()
    kept = (inputs[chosen] == ids[chosen]).mean()
    assert abs(as_mask - 0.8) < 0.05 and abs(kept - 0.1) < 0.04 and abs(1 - as_mask - kept - 0.1) < 0.04
    assert (inputs[~chosen] == ids[~chosen]).all()  # nothing else changes
    # a pickled collator (what a spawned loader worker or DDP rank gets) masks the same
    import pickle

    copy = pickle.loads(pickle.dumps(datamodule.collator(cuda=False)))
    assert torch.equal(copy([train[k] for k in range(n)])["labels"], batch["labels"])
    # one example's mask does not depend on its batch; the next epoch draws another one
    alone = collate(datamodule, "train", [5])
    width = alone["input_ids"].shape[1]
    assert torch.equal(alone["labels"][0], batch["labels"][5, :width])
    assert not torch.equal(collate(datamodule, "train", [n + 5])["labels"][0], alone["labels"][0])
    # the training sampler tags indices with the epoch; validation masks are fixed and survive a rebuild
    sampler = datamodule.train_sampler(train)
    sampler.set_epoch(2)
    assert min(sampler) >= 2 * n
    again = masked_data(tmp_path / "texts.csv")
    assert torch.equal(
        collate(datamodule, "validation", range(8))["labels"],
        collate(again, "validation", range(8))["labels"],
    )


def test_whole_word_masking_masks_every_subtoken_of_a_chosen_word(tmp_path):
    datamodule = masked_data(texts_csv(tmp_path / "texts.csv"), masking={"whole_word": True})
    train = datamodule.datasets["train"]
    batch = collate(datamodule, "train", range(len(train)))
    split_words = 0
    for row in range(len(train)):
        spans = train[row]["offset_mapping"][1:-1]  # without [CLS] / [SEP]
        labels = batch["labels"][row, 1 : len(spans) + 1].numpy()
        word = np.cumsum(np.r_[True, spans[1:, 0] != spans[:-1, 1]])  # a gap starts a new word
        for w in np.unique(word):
            chosen = labels[word == w] != IGNORE_INDEX
            assert chosen.all() or not chosen.any()
            split_words += int(chosen.all() and chosen.size > 1)
    assert split_words > 10
    chosen = batch["labels"] != IGNORE_INDEX
    assert (
        batch["input_ids"][chosen] == datamodule.tokenizer.mask_token_id
    ).all()  # transformers 5: all [MASK]


def test_masking_options_and_labelled_options_are_checked(tmp_path):
    csv = texts_csv(tmp_path / "texts.csv", n=40)
    with pytest.raises(ConfigError, match="data.masking.prob is not a masking option"):
        masked_data(csv, masking={"prob": 0.2})
    with pytest.raises(ConfigError, match="replace_mask \\+ replace_random"):
        masked_data(csv, masking={"replace_mask": 0.9, "replace_random": 0.2})
    with pytest.raises(ConfigError, match="data.examples_per_class=4 does not apply to data.task=masked_lm"):
        masked_data(csv, examples_per_class=4)
    # classification still needs its label column, named in the error
    plain = TextClassificationDataModule(TextPreprocessing(MINILM, 128), source="files", train_file=str(csv))
    with pytest.raises(DataError, match="data.label_column='label' is not a column"):
        plain.setup("fit")


def test_exclude_eval_texts_leaves_out_what_the_labelled_runs_hold_out(tmp_path):
    reviews = tiny_reviews(60).rename(columns={"review": "text", "stars": "label"})
    plots = pd.DataFrame({"text": [f"an unlabelled plot summary #{i}" for i in range(30)], "label": None})
    csv = tmp_path / "corpus.csv"
    pd.concat([reviews, plots]).to_csv(csv, index=False)

    def norm(text: str) -> str:  # as the uncased tokenizer decodes it
        return text.lower().replace(" ", "")

    def texts(datamodule, split: str) -> set[str]:
        decode = datamodule.tokenizer.decode
        dataset = datamodule.datasets[split]
        return {norm(decode(dataset[i]["input_ids"], skip_special_tokens=True)) for i in range(len(dataset))}

    mlm = masked_data(csv, split_seed=0, exclude_eval_texts=True)
    seen = set().union(*(texts(mlm, s) for s in ("train", "validation", "test")))
    for seed in (1, 2):  # every seed of the labelled runs tests on the reviews left out
        labelled = TextClassificationDataModule(
            TextPreprocessing(MINILM, 128), source="files", train_file=str(csv), seed=seed, split_seed=0
        )
        labelled.setup("fit")
        held = {norm(t) for s in ("validation", "test") for t in labelled.raw_inputs(s)[0]}
        assert len(held) == 24 and not held & seen
        assert {norm(t) for t in labelled.raw_inputs("train")[0]} <= seen
    assert len(seen) == 150 - 24 and {norm(t) for t in plots["text"]} <= seen  # plots stay
    assert len(texts(masked_data(csv, split_seed=0), "train")) > len(
        texts(mlm, "train")
    )  # default: every text
    (tmp_path / "plain.txt").write_text("a line of text\n" * 20)
    with pytest.raises(ConfigError, match="data.exclude_eval_texts=true .* needs the source's labels"):
        masked_data(tmp_path / "plain.txt", exclude_eval_texts=True)
    with pytest.raises(ConfigError, match="data.exclude_eval_texts applies to data.task=masked_lm only"):
        TextClassificationDataModule(
            TextPreprocessing(MINILM, 128), source="files", train_file=str(csv), exclude_eval_texts=True
        )


def test_plain_text_files_one_text_per_line(tmp_path):
    import gzip

    lines = ["a wonderful, moving film", "", "  boring and far too long  ", "funny and warm"] * 10
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    with gzip.open(tmp_path / "valid.txt.gz", "wt") as f:
        f.write("the plot makes no sense\nsmart, tender and true\n")
    datamodule = masked_data(tmp_path / "train.txt", validation_file=str(tmp_path / "valid.txt.gz"))
    sizes = {split: len(d) for split, d in datamodule.datasets.items()}
    assert sizes["validation"] == 2 and sizes["train"] + sizes["test"] == 30  # blank lines dropped
    first = datamodule.tokenizer.decode(
        datamodule.datasets["validation"][0]["input_ids"], skip_special_tokens=True
    )
    assert first == "the plot makes no sense"
    with pytest.raises(DataFileError, match="data.validation_file=.*missing.txt.*no such file"):
        masked_data(tmp_path / "train.txt", validation_file=str(tmp_path / "missing.txt"))


def test_rotten_tomatoes_gives_every_text_for_masked_lm():
    from ftlab.data.sources import load_text_source

    corpus = pd.read_csv(assets.embedded_path("rotten_tomatoes"))
    texts = load_text_source("rotten_tomatoes", unlabelled=True)["train"]
    labelled = load_text_source("rotten_tomatoes")["train"]
    # 13,905 rows (7,403 fresh, 5,405 rotten, 1,097 plot): 14 empty and 56 repeated texts dropped
    assert len(texts) == 13_835 and len(labelled) == 12_752 and list(texts.columns) == ["text"]
    plots = set(corpus.loc[corpus["category"] == "plot", "text"].dropna())
    assert plots <= set(texts["text"]) and not plots & set(labelled["text"])


MLM = ["model=tiny_bert", "task=masked_lm", "data=text_files", "data.text_column=text", "data.max_length=32"]
MLM += [
    "data.batch_size=16",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "callbacks.progress_bar.kind=log",
]


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory) -> tuple[Path, dict]:
    """A masked-LM run from a CSV with one text column (no labels) of a tiny repeated corpus."""
    tmp = tmp_path_factory.mktemp("mlm")
    csv = tmp / "texts.csv"
    texts = [f"{row.review.split(' #')[0]}" for row in tiny_reviews(40).itertuples()]
    pd.DataFrame({"text": texts}).to_csv(csv, index=False)
    overrides = [*MLM, f"data.train_file={csv}", f"paths.cache_dir={tmp}/cache", "optimizer.lr=3e-3"]
    overrides += ["trainer.max_epochs=3", "logger=csv", "scheduler=constant"]
    from ftlab.train import train

    cfg = compose_cfg(overrides, tmp / "run")
    (tmp / "run" / ".hydra").mkdir(parents=True)
    (tmp / "run" / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))  # as a Hydra job writes it
    return tmp / "run", train(cfg)


def test_masked_lm_run_from_unlabelled_csv_lowers_perplexity(mlm_run):
    run_dir, metrics = mlm_run
    assert metrics["task"] == "masked_lm" and metrics["monitor"] == "val/perplexity"
    history = pd.read_csv(next(run_dir.glob("csv/**/metrics.csv")))
    val = history["val/perplexity"].dropna().to_numpy()
    assert len(val) == 3 and val[-1] < 0.5 * val[0]  # the same fixed validation masks every epoch
    assert metrics["test/perplexity"] < 0.5 * val[0] and np.isfinite(metrics["test/loss"])
    assert (run_dir / "backbone.pt").is_file()  # task=masked_lm saves the adapted backbone
    # ftlab-eval scores the same fixed test masks: the run's own test metrics again
    from hydra import compose, initialize_config_dir

    from ftlab.evaluate import evaluate

    from conftest import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=[f"run={run_dir}", "split=test", f"output_dir={run_dir}/eval"])
    assert evaluate(cfg)["test/perplexity"] == pytest.approx(metrics["test/perplexity"], rel=1e-5)


def test_decoder_is_tied_to_the_word_embeddings_and_fill_mask_predicts(mlm_run):
    run = load_run(mlm_run[0])
    embeddings = run.module.backbone.input_embeddings().weight
    assert run.module.head.decoder_weight is embeddings
    assert run.module.head.decoder_weight.data_ptr() == embeddings.data_ptr()
    assert not any("decoder" in k for k in run.module.head.state_dict())  # stored once, in the backbone
    datamodule = datamodule_for(run, setup=False)
    items = datamodule.encode(["a [MASK] film, [MASK] and warm"])
    rows = run.module.task.decode(run.module(datamodule.collator(cuda=False)(items)), items, top_k=3)
    assert [m["position"] for m in rows[0]["masks"]] == items[0]["mask_positions"] and len(
        rows[0]["masks"]
    ) == 2
    probabilities = [c["probability"] for c in rows[0]["masks"][0]["candidates"]]
    assert probabilities == sorted(probabilities, reverse=True) and len(probabilities) == 3
    assert rows[0]["filled"][0] == rows[0]["masks"][0]["candidates"][0]["token"]


def test_head_starts_from_the_checkpoints_own_mlm_head_when_it_has_one(tmp_path, caplog):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    source = BertForMaskedLM(config)
    torch.nn.init.normal_(source.cls.predictions.bias)
    source.save_pretrained(tmp_path / "bert_mlm")
    with caplog.at_level(logging.INFO, logger="ftlab.models.backbones.text"):
        head = HFTextBackbone(str(tmp_path / "bert_mlm")).masked_lm_head()
    assert "initialised from the checkpoint's own head" in caplog.text
    assert torch.equal(head.dense.weight, source.cls.predictions.transform.dense.weight)
    assert torch.equal(head.bias, source.cls.predictions.bias)
    from ftlab.models.backbones.text import pretrained_mlm_head

    assert pretrained_mlm_head(MINILM) == {}  # all-MiniLM-L6-v2 ships no masked-LM head: it starts fresh


def fit_steps(tmp_path: Path, overrides: list[str], steps: int = 3):
    """Module state before and after a few masked-LM training steps, and the module."""
    cfg = compose_cfg([*MLM, f"data.train_file={texts_csv(tmp_path / 't.csv', n=64)}", *overrides], tmp_path)
    pl.seed_everything(0)
    backbone = instantiate(cfg.model.backbone)
    datamodule = instantiate(cfg.data, preprocessing=backbone.preprocessing)
    module = build_module(cfg, backbone, datamodule.num_classes, datamodule.label_names, task=datamodule.task)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=datamodule)
    return before, module.state_dict(), module


@pytest.mark.parametrize(
    ("finetune", "frozen"),
    [("head_only", ["embeddings", "layer.0", "layer.1"]), ("freeze_bottom", ["embeddings", "layer.0"])],
)
def test_frozen_groups_stay_unchanged_tied_decoder_included(tmp_path, finetune, frozen):
    before, after, module = fit_steps(tmp_path, [f"finetune={finetune}", "optimizer.lr=1e-2"])
    for group in module.groups:
        changed = [n for n, _ in group.params if not torch.equal(before[n], after[n])]
        assert (not changed) if group.name in frozen else changed, (group.name, changed)


def test_lora_trains_only_adapters_and_the_head(tmp_path):
    before, after, module = fit_steps(tmp_path, ["finetune=lora"])
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k or k.startswith("head.") for k in changed)
    assert any(k.startswith("head.") for k in changed) and any("lora_B" in k for k in changed)
    assert module.head.decoder_weight.requires_grad is False  # the tied embeddings are a frozen base weight


def test_adapted_backbone_feeds_a_classification_run_and_mismatches_are_named(mlm_run, tmp_path):
    run_dir, _ = mlm_run
    saved = torch.load(run_dir / "backbone.pt", weights_only=True)
    cfg = compose_cfg(["model=tiny_bert", f"model.backbone.checkpoint={run_dir}"], tmp_path)
    backbone = instantiate(cfg.model.backbone)
    assert backbone.loaded_checkpoint == str(run_dir / "backbone.pt")
    module = build_module(cfg, backbone, 2, ["neg", "pos"], task="classification")
    state = module.backbone.state_dict()
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in saved)
    # the bottom group only (checkpoint_groups), the rest keeps its initialisation
    partial = HFTextBackbone(
        MINILM,
        pretrained=False,
        checkpoint=str(run_dir),
        checkpoint_groups=1,
        config_overrides=dict(cfg.model.backbone.config_overrides),
    )
    embeddings = "model.embeddings.word_embeddings.weight"
    assert torch.equal(partial.state_dict()[embeddings], saved[embeddings])
    layer = "model.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(partial.state_dict()[layer], saved[layer])
    deeper = {**cfg.model.backbone.config_overrides, "num_hidden_layers": 3}
    with pytest.raises(
        ConfigError,
        match=r"missing keys \['model.encoder.layer.2.* run with model.backbone = .*'num_hidden_layers': 2",
    ):
        HFTextBackbone(MINILM, pretrained=False, checkpoint=str(run_dir), config_overrides=deeper)


def test_lora_adapted_backbone_is_merged_when_transferred(tmp_path):
    before, after, module = fit_steps(tmp_path, ["finetune=lora"], steps=2)
    run = tmp_path / "lora_run"
    (run / ".hydra").mkdir(parents=True)
    cfg = compose_cfg([*MLM, f"data.train_file={tmp_path / 't.csv'}", "finetune=lora"], run)
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (run / "checkpoints").mkdir()
    torch.save(
        {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)},
        run / "checkpoints" / "best.ckpt",
    )
    loaded = HFTextBackbone(
        MINILM,
        pretrained=False,
        checkpoint=str(run),
        config_overrides=dict(cfg.model.backbone.config_overrides),
    )
    from ftlab.finetuning.adapters import merge_peft

    merged = merge_peft(module).backbone.state_dict()
    assert loaded.state_dict().keys() == merged.keys()
    assert all(torch.allclose(loaded.state_dict()[k], merged[k]) for k in merged)


def test_tapt_experiments_compose_with_both_arms():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from conftest import CONF_DIR

    def composed(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("train", overrides=list(overrides), return_hydra_config=True)

    for full in ("", "_full"):
        mlm = composed(f"experiment=tapt_mlm{full}")
        assert (mlm.data.task, mlm.monitor, mlm.monitor_mode) == ("masked_lm", "val/perplexity", "min")
        assert mlm.data.max_train_examples is None and mlm.save_backbone and mlm.model.backbone.pretrained
        grid = composed(f"experiment=tapt{full}")
        params = {k: str(v).split(",") for k, v in grid.hydra.sweeper.params.items()}
        assert params["data.max_train_examples"][:2] == ["500", "4000"] and len(params["seed"]) >= 3
        assert grid.data.task == "classification" and grid.monitor == "val/acc"
        # one held-out split for every seed, left out of the masked-LM corpus
        assert mlm.data.split_seed == grid.data.split_seed == 0 and mlm.data.exclude_eval_texts
        assert (mlm.trainer.accelerator == "gpu") == (grid.trainer.accelerator == "gpu") == (full == "_full")
    script = CONF_DIR.parent / "scripts" / "reproduce_tapt.sh"
    assert (
        "experiment=tapt_mlm$FULL" in script.read_text()
        and "model.backbone.checkpoint=null,$MLM" in script.read_text()
    )
