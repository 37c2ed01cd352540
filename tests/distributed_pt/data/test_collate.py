"""Batching: right-padded training batches, left-padded prompts, and the sharded, resumable batch order."""

from __future__ import annotations

import itertools

import pytest
import torch

from distributed_pt.data.collate import Batch, ShardedBatches, collate, left_pad
from distributed_pt.data.sft import IGNORE_INDEX, Example

PAD = 0


def test_collate_right_pads_ids_mask_and_labels():
    examples = [
        Example([5, 6, 7], [IGNORE_INDEX, 6, 7], "a"),
        Example([8], [8], "b"),
        Example([9, 10, 11, 12], [IGNORE_INDEX, IGNORE_INDEX, 11, 12], "c"),
    ]
    batch = collate(examples, pad_id=PAD)
    assert isinstance(batch, Batch)
    I = IGNORE_INDEX  # noqa: N806
    torch.testing.assert_close(batch.input_ids, torch.tensor([[5, 6, 7, 0], [8, 0, 0, 0], [9, 10, 11, 12]]))
    torch.testing.assert_close(batch.attention_mask, torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]))
    torch.testing.assert_close(batch.labels, torch.tensor([[I, 6, 7, I], [8, I, I, I], [I, I, 11, 12]]))
    assert batch.input_ids.dtype == batch.labels.dtype == batch.attention_mask.dtype == torch.long
    assert batch.num_tokens == 8


def test_collate_pad_id_is_never_labelled():
    # Padding uses pad_id in the ids but always IGNORE_INDEX in the labels, even when pad_id is a real token id.
    batch = collate([Example([3, 4], [3, 4], "a"), Example([3], [3], "b")], pad_id=4)
    assert batch.input_ids[1].tolist() == [3, 4]
    assert batch.labels[1].tolist() == [3, IGNORE_INDEX]


def test_batch_to_keeps_fields():
    batch = collate([Example([1, 2], [1, 2], "a")], pad_id=PAD).to("cpu")
    assert batch.input_ids.tolist() == [[1, 2]] and batch.labels.tolist() == [[1, 2]]
    assert batch.attention_mask.tolist() == [[1, 1]]


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4], [5, 6]], pad_id=PAD)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4], [0, 5, 6]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert ids.dtype == mask.dtype == torch.long


def take(it, k: int) -> list:
    return list(itertools.islice(it, k))


@pytest.mark.parametrize(("n", "mbs", "world"), [(40, 4, 2), (37, 3, 2), (23, 2, 3), (10, 5, 1)])
def test_ranks_are_disjoint_and_cover_the_epoch(n, mbs, world):
    per_epoch = n // (mbs * world)
    for epoch in (0, 1):
        shards = [ShardedBatches(n, mbs, r, world, seed=7).epoch_batches(epoch) for r in range(world)]
        for batches in shards:
            assert len(batches) == per_epoch and all(len(b) == mbs for b in batches)
        flat = [i for batches in shards for b in batches for i in b]
        assert len(flat) == len(set(flat)) == per_epoch * mbs * world  # disjoint; only the ragged tail is dropped
        assert set(flat) <= set(range(n))
        if per_epoch * mbs * world == n:
            assert set(flat) == set(range(n))


def test_order_depends_only_on_seed_and_epoch():
    a, b = ShardedBatches(64, 4, 1, 2, seed=3), ShardedBatches(64, 4, 1, 2, seed=3)
    assert a.epoch_batches(0) == b.epoch_batches(0)
    assert a.epoch_batches(2) == b.epoch_batches(2)
    assert a.epoch_batches(0) != a.epoch_batches(1)  # reshuffled each epoch
    assert a.epoch_batches(0) != ShardedBatches(64, 4, 1, 2, seed=4).epoch_batches(0)
    # Not a trivial order.
    assert [i for batch in a.epoch_batches(0) for i in batch] != sorted(
        i for batch in a.epoch_batches(0) for i in batch
    )


def test_iterate_runs_epoch_after_epoch():
    s = ShardedBatches(20, 3, 0, 2, seed=0)  # 3 micro batches per epoch
    got = take(s.iterate(), 9)
    assert [step for step, _ in got] == list(range(9))
    assert [b for _, b in got] == s.epoch_batches(0) + s.epoch_batches(1) + s.epoch_batches(2)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 7])
def test_iterate_resumes_exactly_where_an_uninterrupted_run_would_be(k):
    s = ShardedBatches(20, 3, 1, 2, seed=5)  # 3 micro batches per epoch: k=3, 4, 7 cross epoch boundaries
    uninterrupted = take(s.iterate(), 12)
    resumed = take(ShardedBatches(20, 3, 1, 2, seed=5).iterate(k), 12 - k)
    assert resumed == uninterrupted[k:]


def test_too_small_dataset_is_an_error():
    with pytest.raises(ValueError, match="fewer than one global micro batch"):
        ShardedBatches(7, 4, 0, 2, seed=0)
    ShardedBatches(8, 4, 0, 2, seed=0)  # exactly one global micro batch is enough
