"""Instruction tuning (data.task=causal_lm): response-only labels, chat template or plain text, packing without
attention across examples, the loss, generation (stops, limits, scores), whole runs with ftlab-predict, and LoRA,
on a tiny random Llama with a word-level tokenizer built in the test; one slow check on the real SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from ftlab import generation
from ftlab.data.instruct import CausalLMCollator, InstructDataModule, InstructExamples, pack
from ftlab.data.instruct_format import ConversationFormat, encode_conversation
from ftlab.data.instruct_sources import entity_list, pair
from ftlab.data.text import TextPreprocessing
from ftlab.tasks import IGNORE_INDEX, build_task
from ftlab.tasks.causal_lm import GenerationScores, last_response
from ftlab.train import train
from ftlab.utils.errors import ConfigError, DataError

from conftest import compose_cfg

CHATML = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
)
WORDS = [
    "Review:",
    "Sentiment:",
    "great",
    "film",
    "awful",
    "boring",
    "fresh",
    "rotten",
    "a",
    "very",
    "long",
    "prompt",
    "word",
]


def make_tiny_llama(folder: Path, chat_template: bool = True) -> Path:
    """A word-level tokenizer (ChatML special tokens, optional chat template) and a 2-layer, 32-wide Llama."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    words = sorted(set(WORDS) | {"user", "assistant", "system"})
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    if chat_template:
        fast.chat_template = CHATML
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=fast.eos_token_id,
        bos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def sentiment_rows(n: int = 48) -> list[dict[str, str]]:
    good, bad = "Review: great film Sentiment:", "Review: awful boring Sentiment:"
    return [{"prompt": good if i % 2 else bad, "response": "fresh" if i % 2 else "rotten"} for i in range(n)]


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- formatting and labels ------------------------------------------------------------------------------------
def test_chat_template_is_applied_and_only_the_response_is_labelled(tokenizer):
    fmt = ConversationFormat(tokenizer, "auto")
    assert fmt.templated
    ids, labels, cut = encode_conversation(fmt, pair("Review: great film Sentiment:", "fresh"), 64)
    rendered = (
        "<|im_start|>user\nReview: great film Sentiment:<|im_end|>\n<|im_start|>assistant\nfresh<|im_end|>\n"
    )
    assert ids.tolist() == ids_of(tokenizer, rendered) and not cut
    scored = labels != IGNORE_INDEX
    assert labels[scored].tolist() == ids_of(tokenizer, "fresh<|im_end|>")  # the answer and the end of turn
    assert scored[-2:].all() and not scored[: len(ids) - 2].any()  # a suffix: the prompt is never scored
    assert fmt.prompt([{"role": "user", "content": "x"}]).endswith("<|im_start|>assistant\n")


def test_plain_format_without_a_template_and_errors(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(make_tiny_llama(tmp_path / "plain", chat_template=False))
    fmt = ConversationFormat(plain, "auto")
    assert not fmt.templated
    ids, labels, _ = encode_conversation(fmt, pair("great film", "fresh"), 64)
    assert ids.tolist() == ids_of(plain, "great film\nfresh<|im_end|>")
    assert labels[labels != IGNORE_INDEX].tolist() == ids_of(plain, "fresh<|im_end|>")
    with pytest.raises(ConfigError, match="no chat template"):
        ConversationFormat(plain, True)
    with pytest.raises(ConfigError, match="auto, true or false"):
        ConversationFormat(plain, "yes")


def test_multi_turn_messages_label_every_assistant_turn(tokenizer):
    messages = [
        {"role": "system", "content": "a"},
        {"role": "user", "content": "great film"},
        {"role": "assistant", "content": "fresh"},
        {"role": "user", "content": "awful boring"},
        {"role": "assistant", "content": "rotten"},
    ]
    ids, labels, _ = encode_conversation(ConversationFormat(tokenizer), messages, 64)
    scored = labels[labels != IGNORE_INDEX].tolist()
    assert scored == ids_of(tokenizer, "fresh<|im_end|> rotten<|im_end|>")
    start, end = last_response(torch.as_tensor(labels))
    assert ids[start:end].tolist() == ids_of(tokenizer, "rotten<|im_end|>")  # what generation is scored on


def test_truncation_cuts_the_prompt_middle_and_keeps_the_response(tokenizer):
    fmt = ConversationFormat(tokenizer)
    long = "Review: " + "very long prompt word " * 30 + "Sentiment:"
    ids, labels, cut = encode_conversation(fmt, pair(long, "fresh"), 40)
    assert cut and len(ids) == 40
    assert labels[labels != IGNORE_INDEX].tolist() == ids_of(tokenizer, "fresh<|im_end|>")
    assert ids[:3].tolist() == ids_of(tokenizer, "<|im_start|>user\nReview:")  # the header is kept
    answer_at = len(ids) - 2
    assert ids[answer_at - 4 : answer_at].tolist() == ids_of(
        tokenizer, "Sentiment:<|im_end|>\n<|im_start|>assistant\n"
    )


def test_collator_pads_labels_with_ignore_index_and_loss_sees_only_response_positions(tokenizer):
    fmt = ConversationFormat(tokenizer)
    items = []
    for prompt, answer in (("great film", "fresh"), ("awful boring very long prompt", "rotten")):
        ids, labels, _ = encode_conversation(fmt, pair(prompt, answer), 64)
        items.append({"input_ids": ids, "labels": labels})
    batch = CausalLMCollator(tokenizer.pad_token_id)(items)
    short = len(items[0]["input_ids"])
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all() and (
        batch["attention_mask"][0, short:] == 0
    ).all()
    task = build_task("causal_lm", len(tokenizer))
    logits = torch.randn(*batch["input_ids"].shape, len(tokenizer), requires_grad=True)
    task.loss(logits, batch["labels"]).backward()
    # logits at t predict token t + 1: only positions followed by a response token get a gradient
    expected = torch.zeros_like(batch["labels"], dtype=torch.bool)
    expected[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
    assert torch.equal(logits.grad.abs().sum(-1) > 0, expected)
    changed = logits.detach().clone()
    changed[~expected] = torch.randn_like(changed[~expected])  # prompt and padding positions
    loss = float(task.loss(logits.detach(), batch["labels"]))
    assert float(task.loss(changed, batch["labels"])) == pytest.approx(loss)


def batch_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}


def test_packing_keeps_examples_apart(tiny_llama, tokenizer):
    from transformers import AutoModelForCausalLM

    fmt = ConversationFormat(tokenizer)
    encoded = [
        encode_conversation(fmt, pair(p, a), 64)
        for p, a in [("great film", "fresh"), ("awful", "rotten"), ("a", "fresh")]
    ]
    examples = InstructExamples([e[0] for e in encoded], [e[1] for e in encoded])
    packed = pack(examples, max_length=2 * len(encoded[0][0]) + 2, seed=0)
    assert sum(len(x) for x in packed.ids) == sum(len(x) for x in examples.ids) and len(packed) == 2
    batch = CausalLMCollator(tokenizer.pad_token_id)([packed[i] for i in range(len(packed))])
    assert "attention_mask" not in batch and (batch["position_ids"][:, 0] == 0).all()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.no_grad():
        logits = model(**batch_inputs(batch), use_cache=False).logits
    positions = packed.positions[0]
    starts = [*np.flatnonzero(positions == 0).tolist(), len(positions)]
    assert len(starts) > 2  # the first row holds two examples
    for a, b in zip(starts[:-1], starts[1:], strict=False):
        with torch.no_grad():
            alone = model(input_ids=batch["input_ids"][0, a:b][None]).logits[0]
        # the same logits as the example on its own: attention never reaches into the other example
        assert torch.allclose(logits[0, a:b], alone, atol=1e-5)
    assert torch.equal(
        torch.cat([torch.as_tensor(x) for x in packed.labels]).sort().values,
        torch.cat([torch.as_tensor(x) for x in examples.labels]).sort().values,
    )


# --- generation and its scores --------------------------------------------------------------------------------
def test_scores_normalise_and_count():
    assert generation.exact_match("  Fresh. ", "fresh") and not generation.exact_match("fresh!", "rotten")
    assert generation.exact_match("person: John; geo-loc: Paris", "Person: john; Geo-loc: paris")
    assert generation.token_f1("person john smith", "person john") == pytest.approx(
        2 * 1.0 * 2 / 3 / (1 + 2 / 3)
    )
    assert generation.token_f1("", "") == 1.0 and generation.token_f1("x", "") == 0.0
    scores = GenerationScores()
    scores.update([], [])  # what every step does; generation_step adds the scored examples
    assert scores.compute() == {}  # a stage that generated nothing reports nothing
    scores.update(["fresh", "rotten", "The rotten"], ["fresh", "fresh", "rotten"])
    values = scores.compute()
    assert values["exact_match"] == pytest.approx(2 / 3) and values["f1"] == pytest.approx(2 / 3)


def test_generation_stops_after_max_new_tokens(tiny_llama, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.no_grad():
        model.model.norm.weight.zero_()  # every logit 0: greedy picks token 0 (<pad>), never a stop token
    assert generation.stop_token_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    prompts = [torch.tensor(ids_of(tokenizer, "great film")), torch.tensor(ids_of(tokenizer, "a"))]
    out = generation.generate(model, tokenizer, prompts, max_new_tokens=5)
    assert out == [[0] * 5, [0] * 5]
    with pytest.raises(ConfigError, match="max_new_tokens=0"):
        generation.generate(model, tokenizer, prompts, max_new_tokens=0)
    ids, mask = generation.left_pad(prompts, 0)
    assert mask.tolist() == [[1, 1], [0, 1]] and ids[1, 1] == prompts[1][0]


def test_demonstration_targets():
    words = ["@x", "john", "smith", "in", "new", "york", "and", "ipad"]
    tags = ["O", "B-person", "I-person", "O", "B-geo-loc", "I-geo-loc", "O", "I-product"]
    assert entity_list(words, tags) == "person: john smith; geo-loc: new york; product: ipad"
    assert entity_list(["hi"], ["O"]) == "none"


def test_messages_jsonl_and_bad_rows(tiny_llama, tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "great film"}, {"role": "assistant", "content": "fresh"}]}
    ] * 20
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = InstructDataModule(TextPreprocessing(str(tiny_llama), 256), train_file=str(path), max_length=32)
    dm.setup("fit")
    assert dm.num_classes == len(dm.tokenizer) and {len(d) for d in dm.datasets.values()} == {16, 2}
    item = dm.datasets["train"][0]
    assert item["labels"][item["labels"] != IGNORE_INDEX].tolist() == ids_of(dm.tokenizer, "fresh<|im_end|>")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n")
    with pytest.raises(DataError, match="row 1: the last message must be the assistant's"):
        InstructDataModule(TextPreprocessing(str(tiny_llama), 256), train_file=str(bad)).setup("fit")
    table = tmp_path / "t.csv"
    pd.DataFrame({"question": ["x"] * 10, "response": ["y"] * 10}).to_csv(table, index=False)
    with pytest.raises(DataError, match="prompt_column='prompt' is not a column"):
        InstructDataModule(TextPreprocessing(str(tiny_llama), 256), train_file=str(table)).setup("fit")


def test_max_eval_examples_is_a_stratified_subset_of_the_held_out_demonstrations(tiny_llama):
    """The embedded sentiment demonstrations: validation and test cut to 40 with the whole split's share of fresh."""
    whole, cut = (
        InstructDataModule(
            TextPreprocessing(str(tiny_llama), 256), source="rotten_tomatoes", max_eval_examples=n, seed=3
        )
        for n in (None, 40)
    )
    for dm in (whole, cut):
        dm.setup("fit")
    fresh = ids_of(cut.tokenizer, "fresh")

    def share_fresh(dataset) -> float:
        answers = [dataset[i]["labels"] for i in range(len(dataset))]
        return sum(a[a != IGNORE_INDEX].tolist()[: len(fresh)] == fresh for a in answers) / len(dataset)

    for split in ("validation", "test"):
        assert len(whole.datasets[split]) > 1000 and len(cut.datasets[split]) == 40
        # stratified by the answer: the whole split's share (58% fresh), to one review
        assert abs(share_fresh(cut.datasets[split]) - share_fresh(whole.datasets[split])) <= 1 / 40
    assert len(cut.datasets["train"]) == len(whole.datasets["train"])
    with pytest.raises(ConfigError, match="data.max_eval_examples=0 must be positive"):
        InstructDataModule(TextPreprocessing(str(tiny_llama), 256), max_eval_examples=0)


# --- whole runs -----------------------------------------------------------------------------------------------
def run_overrides(model: Path, table: Path, tmp_path: Path) -> list[str]:
    return [
        "model=tiny_llama_lm",
        f"model.backbone.name_or_path={model}",
        "model.backbone.pretrained=true",
        "~model.backbone.config_overrides",
        "data=instruct_files",
        f"data.train_file={table}",
        "data.max_length=32",
        "data.batch_size=8",
        "monitor=val/loss",
        "monitor_mode=min",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "callbacks.progress_bar.kind=log",
        "optimizer.lr=1e-2",
        f"paths.cache_dir={tmp_path}/cache",
    ]


def test_a_run_learns_the_answers_and_predict_generates_them(tiny_llama, tmp_path):
    from ftlab.predict import predict

    table = tmp_path / "sentiment.csv"
    pd.DataFrame(sentiment_rows()).to_csv(table, index=False)
    before = train(
        compose_cfg([*run_overrides(tiny_llama, table, tmp_path), "+trainer.max_steps=0"], tmp_path / "r0")
    )
    out = tmp_path / "run"
    cfg = compose_cfg([*run_overrides(tiny_llama, table, tmp_path), "trainer.max_epochs=8"], out)
    after = train(cfg)
    # random weights answer nothing right; eight short epochs on two repeated examples learn both answers
    assert before["test/exact_match"] == 0.0 and after["test/exact_match"] == 1.0
    assert (
        after["test/loss"] < 0.5 * before["test/loss"]
        and after["test/perplexity"] < before["test/perplexity"]
    )
    assert after["params/head/total"] == 0  # the model's own (tied) LM head: no new parameters
    # the test stage's generations are in the run folder, each with its prompt, reference and scores
    for run, record in ((tmp_path / "r0", before), (out, after)):
        rows = [json.loads(line) for line in (run / "generations_test.jsonl").read_text().splitlines()]
        assert rows and all("Review:" in r["prompt"] and r["reference"] in ("fresh", "rotten") for r in rows)
        assert sum(r["exact_match"] for r in rows) / len(rows) == pytest.approx(record["test/exact_match"])
        assert sum(r["f1"] for r in rows) / len(rows) == pytest.approx(record["test/f1"], abs=1e-3)
    assert all(r["output"] == r["reference"] for r in rows)  # after training: the answers themselves
    (out / ".hydra").mkdir()
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")  # what a Hydra run writes; train() alone does not
    from ftlab.evaluate import evaluate

    values = evaluate(
        OmegaConf.create({"run": str(out), "split": "test", "device": "cpu", "output_dir": None})
    )
    assert values["test/perplexity"] == pytest.approx(
        after["test/perplexity"], rel=1e-4
    )  # ftlab-eval: same metric
    inputs = ["Review: great film Sentiment:", "Review: awful boring Sentiment:"]
    request = {"run": str(out), "inputs": inputs, "output": str(out / "p.jsonl"), "column": None}
    defaults = {
        "ckpt": None,
        "top_k": 1,
        "batch_size": 8,
        "device": "cpu",
        "max_new_tokens": 10,
        "temperature": 0,
    }
    result = predict(OmegaConf.create({**defaults, **request, "pair_column": None}))
    rows = [json.loads(line) for line in (out / "p.jsonl").read_text().splitlines()]
    assert result["examples"] == 2
    assert [r["response"] for r in rows] == ["fresh", "rotten"]
    assert [r["new_tokens"] for r in rows] == [1, 1]  # stopped at the end of turn, not at max_new_tokens=10


def test_lora_trains_the_adapters_only(tiny_llama, tmp_path):
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    from ftlab.runs import rebuild

    table = tmp_path / "sentiment.csv"
    pd.DataFrame(sentiment_rows(16)).to_csv(table, index=False)
    overrides = [
        *run_overrides(tiny_llama, table, tmp_path),
        "finetune=lora",
        "finetune.peft.target_modules=[q_proj,v_proj,gate_proj]",
    ]
    cfg = compose_cfg(overrides)
    pl.seed_everything(0)
    backbone = instantiate(cfg.model.backbone)
    dm = instantiate(cfg.data, preprocessing=backbone.preprocessing)
    module = rebuild.build_module(cfg, backbone, dm.num_classes, dm.label_names, task=dm.task)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = pl.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(module, datamodule=dm)
    changed = {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}
    lora = {n for n in before if "lora_" in n}
    assert lora and changed and changed <= lora  # base weights, embeddings and norms untouched
    assert any(".lora_B." in n for n in changed)
    assert all(not p.requires_grad for n, p in module.named_parameters() if n not in lora)
    tested = trainer.test(module, datamodule=dm, verbose=False)[0]
    assert "test/exact_match" in tested  # generation runs through the peft-wrapped model


@pytest.mark.slow
def test_smollm2_chat_template_labels_and_a_generation_that_stops_at_end_of_turn():
    from ftlab.models.backbones.causal_lm import HFCausalLM

    backbone = HFCausalLM("embedded:smollm2").eval()  # converted once from the GGUF file (cached)
    assert backbone.lora_targets and "down_proj" in backbone.lora_targets
    dm = InstructDataModule(
        backbone.preprocessing, source="rotten_tomatoes", max_train_examples=16, max_eval_examples=4
    )
    dm.setup("fit")
    tokenizer = dm.tokenizer
    item = dm.datasets["test"][0]
    text = tokenizer.decode(item["input_ids"])
    answer = tokenizer.decode(item["labels"][item["labels"] != IGNORE_INDEX])
    assert text.startswith("<|im_start|>system\n") and "Sentiment:<|im_end|>\n<|im_start|>assistant\n" in text
    assert answer in ("fresh<|im_end|>\n", "rotten<|im_end|>\n") and text.endswith(answer)
    (item,) = dm.encode(["What is the capital of Germany? Answer with one word."])
    (tokens,) = generation.generate(backbone.model, tokenizer, [torch.as_tensor(item["input_ids"])], 16)
    assert "Berlin" in tokenizer.decode(tokens) and len(tokens) < 16  # stopped at <|im_end|>
