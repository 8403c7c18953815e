"""Length-bucketed batching: deterministic per (seed, epoch), every example once, batches of similar length."""

from __future__ import annotations

import numpy as np
from torch.utils.data import DistributedSampler

from ftlab.data.samplers import LengthBucketSampler

LENGTHS = np.random.default_rng(0).integers(3, 120, size=1000)


def _batches(sampler: LengthBucketSampler, batch_size: int) -> list[list[int]]:
    order = list(sampler)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def test_same_seed_and_epoch_give_the_same_order_and_set_epoch_changes_it():
    a, b = LengthBucketSampler(LENGTHS, 32, seed=1), LengthBucketSampler(LENGTHS, 32, seed=1)
    assert list(a) == list(b)
    assert list(a) != list(LengthBucketSampler(LENGTHS, 32, seed=2))
    b.set_epoch(1)
    assert list(a) != list(b)
    assert list(b) == list(LengthBucketSampler(LENGTHS, 32, seed=1, epoch=1))  # resume builds it at epoch 1


def test_every_example_exactly_once_per_epoch():
    for epoch in range(3):
        order = list(LengthBucketSampler(LENGTHS, 32, seed=0, epoch=epoch))
        assert sorted(order) == list(range(len(LENGTHS)))


def test_batches_have_similar_lengths_and_are_shuffled():
    bucketed = _batches(LengthBucketSampler(LENGTHS, 32, seed=0), 32)
    shuffled = [np.random.default_rng(0).permutation(len(LENGTHS))[i : i + 32] for i in range(0, 1000, 32)]
    spread = np.mean([np.ptp(LENGTHS[b]) for b in bucketed])
    assert spread < 0.2 * np.mean([np.ptp(LENGTHS[b]) for b in shuffled])
    # padded tokens (batch width x size) fall well below those of a plain shuffle
    padded = sum(LENGTHS[b].max() * len(b) for b in bucketed)
    assert padded < 0.75 * sum(LENGTHS[b].max() * len(b) for b in shuffled)
    widths = [LENGTHS[b].max() for b in bucketed[:-1]]
    assert widths != sorted(widths)  # bucket order is shuffled, not short-to-long


def test_ddp_ranks_get_disjoint_equal_shares_of_the_same_buckets():
    ranks = [LengthBucketSampler(LENGTHS, 16, seed=0, num_replicas=3, rank=r) for r in range(3)]
    assert isinstance(ranks[0], DistributedSampler)  # so Lightning does not re-wrap (and re-shuffle) it
    orders = [list(s) for s in ranks]
    assert len({len(o) for o in orders}) == 1 and len(orders[0]) == len(ranks[0])
    covered = set().union(*orders)
    assert covered == set(range(len(LENGTHS)))
    assert sum(len(o) for o in orders) - len(LENGTHS) < 3  # only the last batch is padded
    # step j of every rank comes from one global bucket: similar lengths across ranks
    for step in range(len(orders[0]) // 16):
        lengths = np.concatenate([LENGTHS[o[step * 16 : (step + 1) * 16]] for o in orders])
        assert np.ptp(lengths) <= 10


def test_data_module_buckets_training_batches_by_default_and_pads_to_max_length_on_request(tmp_path):
    from ftlab.data import TextClassificationDataModule, TextPreprocessing
    from ftlab.utils import assets

    pre = TextPreprocessing(tokenizer=assets.resolve("embedded:all-MiniLM-L6-v2"), max_length=512)
    kw = dict(source="rotten_tomatoes", max_train_examples=400, max_length=64, cache_dir=str(tmp_path))
    bucketed = TextClassificationDataModule(pre, **kw)
    plain = TextClassificationDataModule(pre, bucketing=False, **kw)
    fixed = TextClassificationDataModule(pre, bucketing=False, padding="max_length", **kw)
    widths = {}
    for name, dm in (("bucketed", bucketed), ("plain", plain), ("fixed", fixed)):
        batches = list(dm.train_dataloader())
        assert sum(len(b["labels"]) for b in batches) == 400
        widths[name] = sum(b["input_ids"].numel() for b in batches)
        # the attention mask counts the same real tokens whatever the padding
        widths[name + "_real"] = sum(int(b["attention_mask"].sum()) for b in batches)
    assert isinstance(bucketed.train_dataloader().sampler, LengthBucketSampler)
    assert widths["bucketed_real"] == widths["plain_real"] == widths["fixed_real"]
    assert widths["bucketed"] < 0.8 * widths["plain"] < 0.8 * widths["fixed"]
    assert widths["fixed"] == 400 * 64
