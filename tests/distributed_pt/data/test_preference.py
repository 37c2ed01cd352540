"""Preference pairs: both row kinds, prompt lengths, identical pairs dropped and counted, margins, bad rows named,
DPO's prompt-first truncation and response masks."""

from __future__ import annotations

import pytest

from distributed_pt.config import DataConfig, ModelConfig
from distributed_pt.data.io import DataError, Row, read_rows
from distributed_pt.data.preference import (
    build_pairs,
    collate_dpo_pairs,
    collate_pairs,
    encode_pair,
    load_preference_data,
    truncate_prompt_first,
)
from distributed_pt.data.sft import encode_prompt
from distributed_pt.models.loading import load_tokenizer
from tests.conftest import DEMO


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig())


def test_prompt_rows_share_the_prompt_and_end_with_eos(tok):
    chosen, rejected, margin, prompt_length = encode_pair(
        tok, Row({"prompt": "sort : b a =", "chosen": "a b", "rejected": "b a"}, "x"), False
    )
    prompt = tok("sort : b a =")["input_ids"]
    assert chosen[: len(prompt)] == prompt == rejected[: len(prompt)] and prompt_length == len(prompt)
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
    chosen, rejected, _, prompt_length = encode_pair(tok, row, False)
    assert chosen[:-2] == rejected[:-2] and chosen != rejected
    # the prompt is the user turn with the generation prompt: what a model sees before it answers
    assert prompt_length == len(encode_prompt(tok, user)) and chosen[:prompt_length] == encode_prompt(tok, user)


def test_chat_rows_that_differ_before_the_last_turn_share_only_their_common_tokens(tok):
    row = Row(
        {
            "chosen": [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "c"}],
            "rejected": [{"role": "user", "content": "a d"}, {"role": "assistant", "content": "c"}],
        },
        "x",
    )
    chosen, rejected, _, prompt_length = encode_pair(tok, row, False)
    assert chosen[:prompt_length] == rejected[:prompt_length] and chosen[prompt_length] != rejected[prompt_length]


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


def test_prompt_first_truncation_cuts_the_prompt_start_then_the_response_ends():
    prompt, a, b = list(range(100, 110)), [1, 2, 3, 4], [5, 6]
    # room for the longer response: the prompt loses its first 4 tokens only
    chosen, rejected, n = truncate_prompt_first(prompt + a, prompt + b, 10, max_length=10)
    assert (chosen, rejected, n) == (prompt[4:] + a, prompt[4:] + b, 6)
    # a response longer than half: the prompt keeps max_length // 2 tokens, the responses lose their ends
    chosen, rejected, n = truncate_prompt_first(prompt + a, prompt + b, 10, max_length=6)
    assert (chosen, rejected, n) == (prompt[-3:] + a[:3], prompt[-3:] + b, 3)
    # a short prompt is kept whole
    chosen, rejected, n = truncate_prompt_first(prompt[:2] + a * 3, prompt[:2] + b, 2, max_length=8)
    assert (chosen, rejected, n) == (prompt[:2] + (a * 3)[:6], prompt[:2] + b, 2)


def test_dpo_truncation_keeps_the_end_of_the_prompt_and_drops_empty_responses(tok):
    long_prompt = "reverse : " + " ".join(["cat dog bird fish"] * 6) + " ="
    rows = [
        Row({"prompt": long_prompt, "chosen": "fish bird", "rejected": "dog"}, "f:1"),
        Row({"prompt": "p", "chosen": "a b c d e f g h i j k l", "rejected": "a b c d e f g h i j k m"}, "f:2"),
    ]
    data = DataConfig(max_length=12, truncation="right")
    pairs, stats = build_pairs(tok, rows, data, use_margin=False, prompt_first=True)
    assert stats.truncated == 2 and [p.where for p in pairs] == ["f:1"]  # f:2: identical once cut
    pair = pairs[0]
    prompt_ids = tok(long_prompt)["input_ids"]
    assert max(len(pair.chosen), len(pair.rejected)) == 12
    assert pair.chosen[: pair.prompt_length] == prompt_ids[-pair.prompt_length :]  # the prompt's end survives
    assert pair.chosen[pair.prompt_length :] == tok("fish bird", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id
    ]
    with pytest.raises(DataError, match="f:1: .* longer than data.max_length=12"):
        build_pairs(tok, rows[:1], DataConfig(max_length=12, truncation="error"), False, prompt_first=True)


def test_dpo_response_mask_covers_each_side_after_its_prompt(tok):
    rows = [Row({"prompt": "sort : b a =", "chosen": "a b", "rejected": "b a b a"}, "x")]
    pairs, _ = build_pairs(tok, rows, DataConfig(), False, prompt_first=True)
    batch, response, segment = collate_dpo_pairs(pairs, tok.pad_token_id)
    ids, mask = batch.input_ids, batch.attention_mask
    assert segment[:, 0].tolist() == [0, 1] and (segment == segment[:, :1]).all()
    p = pairs[0]
    assert response[0].tolist() == [p.prompt_length <= j < len(p.chosen) for j in range(ids.size(1))]
    assert response[1].tolist() == [p.prompt_length <= j < len(p.rejected) for j in range(ids.size(1))]
    assert not (response & ~mask.bool()).any()


def test_cached_pairs_carry_prompt_lengths(tok, tmp_path):
    data = DataConfig(train_files=[str(DEMO / "pref_eval.jsonl")], max_length=64)
    cached, _, _ = load_preference_data(tok, data, 0, False, tmp_path, prompt_first=True)
    in_memory, _ = build_pairs(tok, read_rows(data.train_files), data, False, prompt_first=True)
    assert [p.prompt_length for p in cached] == [p.prompt_length for p in in_memory]
    assert all(0 < p.prompt_length < min(len(p.chosen), len(p.rejected)) for p in cached)
