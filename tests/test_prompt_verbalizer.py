"""prompt=verbalizer: prompt-based fine-tuning (LM-BFF / PET) on a tiny random Llama and a tiny BERT.

The answer slot's features are checked against unpadded forwards (left and right padding), the head's first logits
against the LM's own logits and zero_shot=llm's scores, and runs for what trains under full, LoRA and head_only.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from ftlab.data.text import PadCollator, load_tokenizer
from ftlab.models.backbones.causal_lm import HFCausalLM
from ftlab.models.backbones.text import HFTextBackbone
from ftlab.prompting import PromptFormat
from ftlab.runs.rebuild import datamodule_for, load_run
from ftlab.train import train
from ftlab.utils import assets
from ftlab.utils.errors import ConfigError, DataError
from ftlab.verbalizer import Verbalizer, VerbalizerHead

from conftest import CONF_DIR, compose_cfg, read_json, tiny_reviews, tiny_text_overrides

MINILM = "embedded:all-MiniLM-L6-v2"
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
FILMS = ["great film", "awful boring long film", "great great film", "awful film"]
WORDS = {"fresh": "fresh", "rotten": "rotten"}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from test_causal_lm import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("llama"), chat_template=False)


def tiny_bert(**kwargs) -> HFTextBackbone:
    return HFTextBackbone(
        MINILM, pretrained=False, config_overrides={**TINY_BERT, "max_position_embeddings": 128}, **kwargs
    )


def verbalizer_module(backbone, label_words=WORDS, labels=("fresh", "rotten"), **kwargs):
    """The prompt backbone and its initialised head, as train() builds them (without data or a trainer)."""
    prompt_backbone = Verbalizer(label_words=label_words, **kwargs).wrap(backbone)
    module = SimpleNamespace(backbone=prompt_backbone, head=VerbalizerHead(prompt_backbone.out_features, 2))
    Verbalizer(label_words=label_words, **kwargs).init_head(module, list(labels))
    return module


def left_padded(rows: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :], mask[i, width - len(row) :] = torch.tensor(row), 1
    return {"input_ids": ids, "attention_mask": mask}


# --- templates ---------------------------------------------------------------------------------------------------
def test_truncation_cuts_the_text_and_keeps_the_answer_slot(tiny_llama):
    bert = load_tokenizer(assets.resolve(MINILM))
    masked = PromptFormat("{text} It was {mask}.", bert.mask_token)
    long = "a film that goes on and on " * 10
    short, cut = masked.encode(bert, ["a fine film", long], 16)
    assert short == bert("a fine film It was [MASK].")["input_ids"]  # short texts: the filled template as is
    tail = bert("x It was [MASK].")["input_ids"][-5:]  # it was [MASK] . [SEP]
    assert len(cut) == 16 and cut[-5:] == tail and cut.count(bert.mask_token_id) == 1
    assert long.startswith(bert.decode(cut[1:-5]))  # the text's start survives, its end is cut
    # a [MASK] typed inside the text is not a second answer slot
    assert masked.encode(bert, ["[MASK] film"], 16)[0].count(bert.mask_token_id) == 1
    # text pairs: both texts cut, the longer one first, the template (and its one mask) whole
    pair = PromptFormat("{text} ? {mask} , {pair}", bert.mask_token)
    (both,) = pair.encode(bert, [long], 20, pairs=["a short second text"])
    assert len(both) == 20 and both.count(bert.mask_token_id) == 1
    assert bert.decode(both[-6:]).endswith("a short second text [SEP]")  # the shorter text whole
    with pytest.raises(DataError, match="holds {pair}, one for single texts does not"):
        masked.encode(bert, ["a film"], 16, pairs=["another"])
    words = load_tokenizer(str(tiny_llama))
    decoder = PromptFormat("Review: {text}\nSentiment:")
    (row,) = decoder.encode(words, [" ".join(["great film"] * 20)], 8)
    assert words.convert_ids_to_tokens(row) == [
        "Review:",
        "great",
        "film",
        "great",
        "film",
        "great",
        "film",
        "Sentiment:",
    ]
    with pytest.raises(ConfigError, match="alone takes 2 tokens, data.max_length=2"):
        decoder.encode(words, ["great film"], 2)


@pytest.mark.parametrize(
    ("kwargs", "masked", "message"),
    [
        ({"template": "Sentiment:"}, False, "must contain the field {text}"),
        ({"template": "Review: {text} {mask}"}, False, "without {mask}"),
        ({"template": "{text} It was good."}, True, "the fields {text} and {mask}, once each"),
        ({"template": "{text} {mask} {label}"}, True, "no other field"),
        ({"template": "{text} {mask} {pair}"}, True, "must contain the fields {text} and {mask}, once each"),
        ({"multi_token": "mean"}, False, "prompt.multi_token='mean' is not one of error, first"),
    ],
)
def test_bad_templates_are_clear_config_errors(tiny_llama, kwargs, masked, message):
    backbone = tiny_bert() if masked else HFCausalLM(str(tiny_llama))
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        Verbalizer(**kwargs).wrap(backbone)


def test_unknown_labels_multi_token_words_and_other_backbones_are_refused(tiny_llama):
    words = load_tokenizer(str(tiny_llama))
    with pytest.raises(ConfigError, match=r"names \['good'\], which are not labels of the data"):
        Verbalizer(label_words={"good": "great"}).word_ids(words, ["fresh", "rotten"])
    with pytest.raises(
        ConfigError, match=r"'great film' \(label 'fresh'\) is 2 tokens \(\['great', 'film'\]\)"
    ):
        Verbalizer(label_words={"fresh": "great film"}).word_ids(words, ["fresh", "rotten"])
    first = Verbalizer(label_words={"fresh": "great film"}, multi_token="first").word_ids(
        words, ["fresh", "rotten"]
    )
    assert first == [[words.convert_tokens_to_ids("great")], [words.convert_tokens_to_ids("rotten")]]
    with pytest.raises(ConfigError, match="reads a language model's own output layer; model.backbone Linear"):
        Verbalizer().wrap(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="ships none"):  # all-MiniLM-L6-v2 has no masked-LM head
        Verbalizer().wrap(HFTextBackbone(MINILM))


# --- the answer slot -----------------------------------------------------------------------------------------------
def test_decoder_reads_the_next_token_logits_after_the_prompt_with_left_or_right_padding(tiny_llama):
    from ftlab.zero_shot_llm import label_log_likelihoods

    module = verbalizer_module(HFCausalLM(str(tiny_llama)))
    backbone = module.backbone.eval()
    tokenizer = backbone.tokenizer
    prompts = backbone.preprocessing.prompt.encode(tokenizer, FILMS, 64)
    assert len({len(p) for p in prompts}) > 1  # padding matters
    model = backbone.lm.model
    fresh, rotten = (tokenizer.convert_tokens_to_ids(w) for w in ("fresh", "rotten"))
    with torch.no_grad():
        alone = torch.stack(
            [
                backbone({"input_ids": torch.tensor([p]), "attention_mask": torch.ones(1, len(p))})[0]
                for p in prompts
            ]
        )
        right = backbone(PadCollator(0)([{"input_ids": p} for p in prompts]))
        left = backbone(left_padded(prompts, 0))
        torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)
        # before training the head's logits are the LM's next-token logits of the label words
        lm_logits = torch.stack([model(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts])
        torch.testing.assert_close(module.head(left), lm_logits[:, [fresh, rotten]], atol=1e-5, rtol=1e-5)
        # ... so they rank the labels as zero_shot=llm's log-likelihoods do (single-token words: same differences)
        scores = label_log_likelihoods(model, prompts, [[fresh], [rotten]], pad_id=0)
        logits = module.head(right)
    torch.testing.assert_close(logits[:, 0] - logits[:, 1], scores[:, 0] - scores[:, 1], atol=1e-4, rtol=1e-4)


def test_masked_lm_reads_the_mask_position_through_the_mlm_head(tiny_llama):
    module = verbalizer_module(tiny_bert(), {"fresh": "great", "rotten": ["terrible", "bad"]})
    backbone = module.backbone.eval()
    tokenizer = backbone.tokenizer
    prompts = backbone.preprocessing.prompt.encode(tokenizer, FILMS, 32)
    ids = [tokenizer.convert_tokens_to_ids(w) for w in ("great", "terrible", "bad")]
    with torch.no_grad():
        alone = torch.stack(
            [
                backbone(
                    {
                        "input_ids": torch.tensor([p]),
                        "attention_mask": torch.ones(1, len(p), dtype=torch.long),
                    }
                )[0]
                for p in prompts
            ]
        )
        right = backbone(PadCollator(0)([{"input_ids": p} for p in prompts]))
        torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)
        # the masked-LM head's logits at [MASK]: transform, then the tied decoder and its bias
        hidden = torch.stack(
            [
                backbone.lm.token_features(
                    {
                        "input_ids": torch.tensor([p]),
                        "attention_mask": torch.ones(1, len(p), dtype=torch.long),
                    }
                )[0, p.index(tokenizer.mask_token_id)]
                for p in prompts
            ]
        )
        vocab = backbone.transform(hidden) @ backbone.lm.input_embeddings().weight.T + backbone.vocab_bias
        expected = torch.stack([vocab[:, ids[0]], vocab[:, ids[1:]].mean(-1)], -1)  # several words: the mean
        torch.testing.assert_close(module.head(right), expected, atol=1e-5, rtol=1e-5)
    # finetune=lora: the masked-LM transform is frozen with the rest of the LM (only adapters and the head train)
    from ftlab.finetuning import FinetunePolicy, PeftAdapter

    fixed = FinetunePolicy(peft=PeftAdapter()).prepare(backbone)
    assert {f"backbone.transform.{n}" for n, _ in backbone.transform.named_parameters()} <= fixed


def masked_lm_run(folder: Path) -> Path:
    """A run folder as task=masked_lm leaves it (tiny BERT; backbone.pt, best.ckpt with the MLM head)."""
    torch.manual_seed(1)
    backbone = tiny_bert()
    head = backbone.masked_lm_head()
    torch.nn.init.normal_(head.dense.weight)
    torch.nn.init.normal_(head.bias)
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra/config.yaml").write_text("{}")
    (folder / "checkpoints").mkdir()
    torch.save(backbone.state_dict(), folder / "backbone.pt")
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state.update({f"head.{k}": v for k, v in head.state_dict().items()})
    hparams = {"task": "masked_lm", "num_classes": 30522}
    torch.save({"state_dict": state, "hyper_parameters": hparams}, folder / "checkpoints/best.ckpt")
    return folder


# --- runs ---------------------------------------------------------------------------------------------------------
def write_hydra_config(cfg, run_dir: Path) -> None:
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    (run_dir / ".hydra/config.yaml").write_text(OmegaConf.to_yaml(cfg))  # as a Hydra job writes it


def llama_overrides(tiny_llama: Path, tmp_path: Path, *extra: str) -> list[str]:
    rows = [
        {"text": "great film", "label": "fresh"},
        {"text": "awful boring long film", "label": "rotten"},
    ] * 16
    pd.DataFrame(rows).to_csv(tmp_path / "films.csv", index=False)
    return [
        "model=smollm2_lm",
        "prompt=verbalizer",
        f"model.backbone.name_or_path={tiny_llama}",
        "data=text_files",
        f"data.train_file={tmp_path}/films.csv",
        "data.val_fraction=0.25",
        "data.test_fraction=0.25",
        "data.batch_size=8",
        f"paths.cache_dir={tmp_path}/cache",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "callbacks.progress_bar.kind=log",
        "logger=csv",
        *extra,
    ]


def test_full_fine_tuning_moves_the_label_words_toward_the_labels_and_the_folder_evaluates(
    tiny_llama, tmp_path
):
    # before training: the random LM's own label-word logits after the two prompts of the data; the words are
    # assigned so that they start at most at chance (the random LM has no idea which word fits which text)
    model = HFCausalLM(str(tiny_llama)).model.eval()
    tokenizer = load_tokenizer(str(tiny_llama))
    prompts = PromptFormat("Review: {text}\nSentiment:").encode(
        tokenizer, ["great film", "awful boring long film"], 64
    )
    ids = tokenizer.convert_tokens_to_ids(["fresh", "rotten"])
    with torch.no_grad():
        before = torch.stack([model(input_ids=torch.tensor([p])).logits[0, -1, ids] for p in prompts])
    words = (
        "{fresh:fresh,rotten:rotten}"
        if before.argmax(-1).tolist() != [0, 1]
        else "{fresh:rotten,rotten:fresh}"
    )
    before = before if words == "{fresh:fresh,rotten:rotten}" else before.flip(-1)
    before_acc = float((before.argmax(-1) == torch.tensor([0, 1])).float().mean())
    before_loss = float(torch.nn.functional.cross_entropy(before, torch.tensor([0, 1])))
    overrides = ["trainer.max_epochs=4", "optimizer.lr=3e-3", f"prompt.label_words={words}"]
    cfg = compose_cfg(llama_overrides(tiny_llama, tmp_path, *overrides), tmp_path / "run")
    write_hydra_config(cfg, tmp_path / "run")
    metrics = train(cfg)
    assert before_acc <= 0.5 and metrics["test/acc"] == 1.0 and metrics["test/loss"] < before_loss
    history = pd.read_csv(next((tmp_path / "run").glob("csv/**/metrics.csv")))
    losses = history["train/loss_epoch"].dropna().to_numpy()
    assert losses[-1] < losses[0]
    assert metrics["trainable_params"] == metrics["total_params"]  # full: the LM and the head
    # ftlab-eval and ftlab-predict on the run folder
    from hydra import compose, initialize_config_dir

    from ftlab.evaluate import evaluate

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        eval_cfg = compose(
            "eval", overrides=[f"run={tmp_path / 'run'}", "split=test", f"output_dir={tmp_path}/eval"]
        )
    assert evaluate(eval_cfg)["test/acc"] == pytest.approx(metrics["test/acc"])
    run = load_run(tmp_path / "run")
    datamodule = datamodule_for(run, setup=False)
    items = datamodule.encode(["great film", "awful boring long film"])
    with torch.no_grad():
        rows = run.module.task.decode(run.module(datamodule.collator(cuda=False)(items)), items)
    assert [r["label"] for r in rows] == ["fresh", "rotten"]


def test_lora_trains_the_adapters_and_the_head_only(tiny_llama, tmp_path):
    overrides = ["finetune=lora", "trainer.max_epochs=1", "optimizer.lr=1e-3", "finetune.peft.dropout=0.0"]
    cfg = compose_cfg(llama_overrides(tiny_llama, tmp_path, *overrides), tmp_path / "run")
    write_hydra_config(cfg, tmp_path / "run")
    metrics = train(cfg)
    before = HFCausalLM(str(tiny_llama)).model.state_dict()
    after = load_run(tmp_path / "run").module.state_dict()
    base = {
        k.removeprefix("backbone.lm.model.base_model.model.").replace(".base_layer", ""): v
        for k, v in after.items()
    }
    assert all(torch.equal(before[k], base[k]) for k in before)  # every pretrained weight as it was
    adapters = [k for k in after if "lora_" in k]
    assert adapters and any(
        not torch.equal(after[k], torch.zeros_like(after[k])) for k in adapters if "lora_B" in k
    )
    embeddings = before["model.embed_tokens.weight"]  # tied: the LM head's rows
    tokenizer = load_tokenizer(str(tiny_llama))
    initial = embeddings[[tokenizer.convert_tokens_to_ids(w) for w in ("fresh", "rotten")]]
    assert not torch.allclose(after["head.linear.weight"], initial)  # the head trained
    lora = sum(v.numel() for k, v in after.items() if "lora_" in k)
    assert metrics["trainable_params"] == lora + after["head.linear.weight"].numel() + 2


def test_masked_lm_after_adaptation_head_only_trains_the_verbalizer_rows(tmp_path):
    adapted = masked_lm_run(tmp_path / "mlm")
    csv = tmp_path / "reviews.csv"
    tiny_reviews(16).to_csv(csv, index=False)
    overrides = tiny_text_overrides(csv, tmp_path) + [
        "prompt=verbalizer",
        f"model.backbone.checkpoint={adapted}",
        "prompt.label_words={pos:great,neg:terrible}",
        "finetune=head_only",
        "data.max_length=24",
        "trainer.max_epochs=2",
    ]
    cfg = compose_cfg(overrides, tmp_path / "run")
    write_hydra_config(cfg, tmp_path / "run")
    metrics = train(cfg)
    source = torch.load(adapted / "checkpoints/best.ckpt", weights_only=True)["state_dict"]
    after = load_run(tmp_path / "run").module.state_dict()
    for key, value in source.items():  # the adapted encoder and its masked-LM transform, untouched
        if key.startswith("backbone."):
            assert torch.equal(after["backbone.lm." + key.removeprefix("backbone.")], value), key
    for part in ("dense.weight", "dense.bias", "norm.weight", "norm.bias"):
        assert torch.equal(after[f"backbone.transform.{part}"], source[f"head.{part}"]), part
    words = load_tokenizer(assets.resolve(MINILM)).convert_tokens_to_ids(
        ["terrible", "great"]
    )  # labels neg, pos
    rows = source["backbone.model.embeddings.word_embeddings.weight"][words]
    assert not torch.allclose(after["head.linear.weight"], rows)  # started there (test above), then trained
    assert metrics["trainable_params"] == rows.numel() + 2 and np.isfinite(metrics["test/loss"])
    assert read_json(tmp_path / "run/metrics.json")["backbone_checkpoint"] == str(adapted / "backbone.pt")


@pytest.mark.slow
def test_smollm2_verbalizer_with_lora_on_16_rotten_tomatoes_reviews_per_class(tmp_path):
    """The real thing, small: SmolLM2 (converted once from its GGUF file, cached), 16 reviews per class, LoRA, one
    epoch (4 steps); evaluated on 16 validation and 64 test reviews. Its zero-shot start is ~0.78 on these reviews
    (docs/few_shot.md), so a broken verbalizer (wrong slot, wrong rows) shows as chance accuracy."""
    overrides = [
        "model=smollm2_lm",
        "model.backbone.cache_dir=null",  # the GGUF conversion in the user's cache ($FTLAB_CACHE)
        "prompt=verbalizer",
        "prompt.label_words={fresh:positive,rotten:negative}",
        "finetune=lora",
        "data.examples_per_class=16",
        "data.batch_size=8",
        "+data.eval_batch_size=16",
        "data.max_length=48",
        f"paths.cache_dir={tmp_path}/cache",
        "trainer.max_epochs=1",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=4",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "callbacks.progress_bar.kind=log",
    ]
    metrics = train(compose_cfg(overrides, tmp_path / "run"))
    assert metrics["test/acc"] >= 0.65 and np.isfinite(metrics["test/loss"])
    assert metrics["trainable_params"] < 0.05 * metrics["total_params"]  # adapters and the head


def test_text_pairs_fill_the_pair_template(tmp_path):
    rows = [("a fine film", "the film is good", "yes"), ("a fine film", "the film is bad", "no")] * 12
    csv = tmp_path / "pairs.csv"
    pd.DataFrame(rows, columns=["review", "claim", "stars"]).to_csv(csv, index=False)
    overrides = tiny_text_overrides(csv, tmp_path) + [
        "prompt=verbalizer",
        "data.text_pair_column=claim",
        "data.max_length=24",
        "trainer.max_epochs=1",
    ]
    cfg = compose_cfg(overrides, tmp_path / "run")
    assert np.isfinite(train(cfg)["test/loss"])  # labels "no" / "yes": single tokens, the default words
    backbone = Verbalizer().wrap(tiny_bert(), cfg.data)
    assert backbone.preprocessing.prompt.template == "{text} ? {mask} , {pair}"  # LM-BFF's pair template
