"""Preference pairs: both row kinds, identical pairs dropped and counted, margins, bad rows named."""

from __future__ import annotations

import pytest

from distributed_pt.config import DataConfig, ModelConfig
from distributed_pt.data.io import DataError, Row
from distributed_pt.data.preference import build_pairs, collate_pairs, encode_pair, load_preference_data
from distributed_pt.models.loading import load_tokenizer
from tests.conftest import DEMO


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig())


def test_prompt_rows_share_the_prompt_and_end_with_eos(tok):
    chosen, rejected, margin = encode_pair(
        tok, Row({"prompt": "sort : b a =", "chosen": "a b", "rejected": "b a"}, "x"), False
    )
    prompt = tok("sort : b a =")["input_ids"]
    assert chosen[: len(prompt)] == prompt == rejected[: len(prompt)]
    assert chosen[-1] == rejected[-1] == tok.eos_token_id and chosen != rejected and margin == 0.0


def test_chat_rows(tok):
    user = [{"role": "user", "content": "add : 1 + 2 ="}]
    row = Row(
        {
            "chosen": [*user, {"role": "assistant", "content": "3"}],
            "rejected": [*user, {"role": "assistant", "content": "4"}],
        },
        "x",
    )
    chosen, rejected, _ = encode_pair(tok, row, False)
    assert chosen[:-2] == rejected[:-2] and chosen != rejected


def test_identical_pairs_are_dropped_and_counted(tok):
    rows = [
        Row({"prompt": "p", "chosen": "a b", "rejected": "a b"}, "f:1"),
        Row({"prompt": "p", "chosen": "a", "rejected": "b"}, "f:2"),
    ]
    pairs, stats = build_pairs(tok, rows, DataConfig(max_length=64), use_margin=False)
    assert [p.where for p in pairs] == ["f:2"] and stats.dropped["identical chosen and rejected"] == 1


def test_pairs_equal_after_truncation_are_dropped(tok):
    row = Row(
        {"prompt": "reverse : cat dog bird fish =", "chosen": "fish bird dog cat", "rejected": "fish bird dog"}, "f:3"
    )
    pairs, stats = build_pairs(tok, [row], DataConfig(max_length=6, truncation="right"), use_margin=False)
    assert pairs == [] and stats.truncated == 1


def test_margin_field(tok):
    row = Row({"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1.5}, "f:4")
    assert encode_pair(tok, row, use_margin=True)[2] == 1.5
    with pytest.raises(DataError, match="f:5: reward.use_margin"):
        encode_pair(tok, Row({"prompt": "p", "chosen": "a", "rejected": "b"}, "f:5"), use_margin=True)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, "'prompt' must be a string"),
    ],
)
def test_bad_rows_name_the_row(tok, data, message):
    with pytest.raises(DataError, match=f"f.jsonl:9: .*{message}"):
        encode_pair(tok, Row(data, "f.jsonl:9"), False)


def test_collate_puts_chosen_first(tok):
    pairs, _ = build_pairs(tok, [Row({"prompt": "p", "chosen": "a b c", "rejected": "d"}, "x")], DataConfig(), False)
    ids, mask, margin = collate_pairs(pairs, tok.pad_token_id)
    assert ids.shape[0] == 2 and mask[0].sum() > mask[1].sum() and margin.tolist() == [0.0]


def test_bundled_demo_pairs_load(tok, tmp_path):
    cfg = DataConfig(
        train_files=[str(DEMO / "pref_train.jsonl")], eval_files=[str(DEMO / "pref_eval.jsonl")], max_length=64
    )
    train, evals, stats = load_preference_data(tok, cfg, seed=0, use_margin=False, cache_dir=tmp_path)
    assert len(train) > 1000 and len(evals) > 50 and stats["train"].kept == len(train)
