"""SFT data: exact prompt masking (prompt/response and chat rows), truncation, malformed rows, file reading, splits."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from distributed_pt.config import DataConfig, ModelConfig
from distributed_pt.data.io import DataError, Row, read_rows
from distributed_pt.data.sft import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE_INDEX,
    build_examples,
    chat_template,
    encode_prompt,
    encode_row,
    load_sft_data,
    split_rows,
    truncate,
)
from distributed_pt.models.loading import load_tokenizer
from tests.conftest import DEMO

# A template of the tokenizer's own (not the default): BOS first, role tokens with no newlines, "." after system.
OWN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|> {{ m['content'] }} {{ eos_token }}"
    "{% elif m['role'] == 'system' %}<|system|> {{ m['content'] }} ."
    "{% else %}<|user|> {{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig())


@pytest.fixture(scope="module")
def tok_with_template(tok):
    t = copy.deepcopy(tok)
    t.chat_template = OWN_TEMPLATE
    return t


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def jsonl(tmp_path: Path, rows: list, name: str = "d.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def demo_rows(name: str, n: int | None = None) -> list[Row]:
    return read_rows([str(DEMO / name)])[:n]


# --- masking ---------------------------------------------------------------------------------------------------------


def test_prompt_response_masking_is_exactly_the_prompt(tok):
    assert tok.chat_template is None  # the bundled tokenizer: DEFAULT_CHAT_TEMPLATE path
    for row in demo_rows("sft_train.jsonl", 50):
        ids, labels = encode_row(tok, row)
        prompt = tok(row.data["prompt"])["input_ids"]
        response = ids_of(tok, row.data["response"]) + [tok.eos_token_id]
        assert ids == prompt + response
        assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert labels[len(prompt) :] == response
        assert len(ids) == len(labels)
        assert tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]) == (
            row.data["response"] + " " + tok.eos_token
        )


def test_empty_response_still_labels_the_eos(tok):
    ids, labels = encode_row(tok, Row({"prompt": "sort : b a =", "response": ""}, "x:1"))
    assert ids[-1] == tok.eos_token_id
    assert labels == [IGNORE_INDEX] * (len(ids) - 1) + [tok.eos_token_id]


def labelled_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive labelled positions, as token ids (asserting labels equal ids there)."""
    runs, cur = [], []
    for i, lab in zip(ids, labels, strict=True):
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == i
            cur.append(i)
    return runs + ([cur] if cur else [])


def check_chat_masking(tok, messages: list[dict]):
    ids, labels = encode_row(tok, Row({"messages": messages}, "chat:1"))
    assert len(ids) == len(labels)
    assistant = [m["content"] for m in messages if m["role"] == "assistant"]
    # One labelled run per assistant turn: exactly its content tokens and the EOS that ends it.
    assert labelled_runs(ids, labels) == [ids_of(tok, c) + [tok.eos_token_id] for c in assistant]
    for run, content in zip(labelled_runs(ids, labels), assistant, strict=True):
        assert tok.decode(run) == f"{content} {tok.eos_token}"
    # Role markers and every user/system token are masked.
    role_ids = set(tok.convert_tokens_to_ids(["<|system|>", "<|user|>", "<|assistant|>"]))
    assert all(lab == IGNORE_INDEX for i, lab in zip(ids, labels, strict=True) if i in role_ids)
    n_masked = sum(lab == IGNORE_INDEX for lab in labels)
    n_other = sum(len(ids_of(tok, m["content"])) for m in messages if m["role"] != "assistant")
    assert n_masked >= n_other + len(messages)  # content of other turns + one role marker per message
    # Each labelled run starts right after an <|assistant|> marker.
    assistant_id = tok.convert_tokens_to_ids("<|assistant|>")
    starts = [k for k in range(len(ids)) if labels[k] != IGNORE_INDEX and (k == 0 or labels[k - 1] == IGNORE_INDEX)]
    assert all(ids[k - 1] == assistant_id for k in starts)
    return ids, labels


SYSTEM_TWO_TURN = [
    {"role": "system", "content": "answer with the result only ."},
    {"role": "user", "content": "sort : p d y k l ="},
    {"role": "assistant", "content": "d k l p y"},
    {"role": "user", "content": "add : 2 + 5 1 ="},
    {"role": "assistant", "content": "5 3"},
]


def test_chat_masking_with_the_default_template(tok):
    assert chat_template(tok) == DEFAULT_CHAT_TEMPLATE
    ids, _ = check_chat_masking(tok, SYSTEM_TWO_TURN)
    rendered = tok.convert_ids_to_tokens(ids)
    assert rendered[0] == "<|system|>"
    assert rendered.count("<|assistant|>") == 2 and rendered.count("<eos>") == 2


def test_chat_masking_on_the_bundled_chat_sample(tok):
    rows = demo_rows("chat_sample.jsonl")
    assert any(sum(m["role"] == "assistant" for m in r.data["messages"]) >= 2 for r in rows)
    assert any(r.data["messages"][0]["role"] == "system" for r in rows)
    for row in rows:
        check_chat_masking(tok, row.data["messages"])


def test_chat_masking_with_the_tokenizers_own_template(tok, tok_with_template):
    assert chat_template(tok_with_template) == OWN_TEMPLATE
    ids, labels = check_chat_masking(tok_with_template, SYSTEM_TWO_TURN)
    # The tokenizer's template was used, not the default: it starts with BOS and has a "." after the system turn.
    assert ids[0] == tok.bos_token_id and labels[0] == IGNORE_INDEX
    assert ids != encode_row(tok, Row({"messages": SYSTEM_TWO_TURN}, "chat:1"))[0]
    for row in demo_rows("chat_sample.jsonl"):
        check_chat_masking(tok_with_template, row.data["messages"])


def test_chat_without_an_assistant_turn_is_all_masked_and_dropped(tok):
    row = Row({"messages": [{"role": "user", "content": "sort : b a ="}]}, "only_user:1")
    _, labels = encode_row(tok, row)
    assert set(labels) == {IGNORE_INDEX}
    examples, stats = build_examples(tok, [row], max_length=64, truncation="right")
    assert examples == [] and stats.dropped["with no response token"] == 1


def test_assistant_first_conversation_is_labelled_or_a_located_data_error(tok):
    row = Row({"messages": [{"role": "assistant", "content": "a b"}, {"role": "user", "content": "c"}]}, "f.jsonl:7")
    try:
        ids, labels = encode_row(tok, row)
    except DataError as e:
        assert "f.jsonl:7" in str(e)
        return
    assert labelled_runs(ids, labels) == [ids_of(tok, "a b") + [tok.eos_token_id]]


def test_encode_prompt_matches_the_training_prefix(tok):
    # The generation prompt is exactly the masked prefix of the training example.
    messages = SYSTEM_TWO_TURN[:2]
    prompt = encode_prompt(tok, messages)
    ids, labels = encode_row(tok, Row({"messages": [*messages, {"role": "assistant", "content": "d k"}]}, "x"))
    assert ids[: len(prompt)] == prompt
    assert labels[len(prompt) - 1] == IGNORE_INDEX and labels[len(prompt)] != IGNORE_INDEX
    assert encode_prompt(tok, "sort : b a =") == tok("sort : b a =")["input_ids"]


# --- truncation ------------------------------------------------------------------------------------------------------

LONG = {"prompt": "reverse : cat dog sun pen cup key =", "response": "key cup pen sun dog cat"}  # 9 + 7 tokens


def test_truncate_right_keeps_the_start(tok):
    ids, labels = encode_row(tok, Row(LONG, "x:1"))
    assert len(ids) == 16
    (ex,), stats = build_examples(tok, [Row(LONG, "x:1")], max_length=12, truncation="right")
    assert ex.input_ids == ids[:12] and ex.labels == labels[:12]
    assert stats.truncated == 1 and stats.kept == 1 and not stats.dropped


def test_truncate_left_keeps_the_end(tok):
    ids, labels = encode_row(tok, Row(LONG, "x:1"))
    (ex,), stats = build_examples(tok, [Row(LONG, "x:1")], max_length=10, truncation="left")
    assert ex.input_ids == ids[-10:] and ex.labels == labels[-10:]
    assert ex.input_ids[-1] == tok.eos_token_id  # the whole response and its EOS survive
    assert sum(lab != IGNORE_INDEX for lab in ex.labels) == 7
    assert stats.truncated == 1


def test_short_rows_are_not_truncated(tok):
    ids, labels = encode_row(tok, Row(LONG, "x:1"))
    for policy in ("right", "left", "error"):
        (ex,), stats = build_examples(tok, [Row(LONG, "x:1")], max_length=16, truncation=policy)
        assert ex.input_ids == ids and ex.labels == labels and stats.truncated == 0
    assert truncate(ids, labels, 16, "error", "x:1") == (ids, labels)


def test_truncate_error_names_file_and_line(tok, tmp_path):
    path = jsonl(tmp_path, [{"prompt": "a", "response": "b"}, LONG])
    rows = read_rows([str(path)])
    with pytest.raises(DataError) as e:
        build_examples(tok, rows, max_length=12, truncation="error")
    assert f"{path}:2" in str(e.value) and "max_length=12" in str(e.value)


def test_right_truncation_drops_rows_with_no_response_left_and_counts_them(tok):
    rows = [Row(LONG, "x:1"), Row({"prompt": "a", "response": "b"}, "x:2"), Row(LONG, "x:3")]
    examples, stats = build_examples(tok, rows, max_length=9, truncation="right")  # 9 = the prompt of LONG
    assert [e.where for e in examples] == ["x:2"]
    assert stats.rows == 3 and stats.kept == 1 and stats.truncated == 2
    assert stats.dropped["with no response token"] == 2
    assert "1/3 rows kept" in stats.summary() and "2 with no response token" in stats.summary()


# --- malformed rows --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"prompt": "a"}, "missing field 'response'"),
        ({"response": "a"}, "missing field 'prompt'"),
        ({"prompt": 3, "response": "a"}, "field 'prompt' must be a string, got int"),
        ({"prompt": "a", "response": ["b"]}, "field 'response' must be a string"),
        ({"messages": "hello"}, "field 'messages' must be a non-empty list"),
        ({"messages": []}, "field 'messages' must be a non-empty list"),
        ({"messages": [{"role": "user"}]}, r"messages\[0\] must be an object with string 'role' and 'content'"),
        ({"messages": [{"role": "user", "content": "a"}, {"content": "b"}]}, r"messages\[1\]"),
        ({"messages": [{"role": "user", "content": 5}]}, r"messages\[0\]"),
        ({"messages": ["hi"]}, r"messages\[0\]"),
    ],
)
def test_malformed_rows_name_file_and_line(tok, tmp_path, bad, match):
    path = jsonl(tmp_path, [{"prompt": "a", "response": "b"}, "", bad])  # line 2 is blank: the bad row is line 3
    rows = read_rows([str(path)])
    assert [r.where for r in rows] == [f"{path}:1", f"{path}:3"]
    with pytest.raises(DataError, match=match) as e:
        build_examples(tok, rows, max_length=64, truncation="right")
    assert f"{path}:3:" in str(e.value)


# --- reading files ---------------------------------------------------------------------------------------------------


def test_read_jsonl_malformed_line_number(tmp_path):
    path = jsonl(tmp_path, [{"prompt": "a", "response": "b"}, "", '{"prompt": "a", "response": }'])
    with pytest.raises(DataError, match="malformed JSON") as e:
        read_rows([str(path)])
    assert f"{path}:3:" in str(e.value)


def test_read_jsonl_line_must_be_an_object(tmp_path):
    path = jsonl(tmp_path, [{"prompt": "a", "response": "b"}, "[1, 2]"])
    with pytest.raises(DataError, match=f"{path}:2: each line must be a JSON object, got list"):
        read_rows([str(path)])


def test_read_jsonl_non_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    with pytest.raises(DataError, match="not valid UTF-8") as e:
        read_rows([str(path)])
    assert f"{path}:2:" in str(e.value)


def test_read_json_list_and_data_key(tmp_path):
    rows = [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]
    plain, wrapped = tmp_path / "plain.json", tmp_path / "wrapped.json"
    plain.write_text(json.dumps(rows))
    wrapped.write_text(json.dumps({"data": rows, "meta": 1}))
    for path in (plain, wrapped):
        got = read_rows([str(path)])
        assert [r.data for r in got] == rows
        assert [r.where for r in got] == [f"{path}[row 0]", f"{path}[row 1]"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('[{"prompt": "a"},\n {"prompt": }]', r":2: malformed JSON"),
        ('{"rows": []}', "expected a list of row objects"),
        ('"hello"', "expected a list of row objects"),
        ('[{"prompt": "a", "response": "b"}, 3]', r"\[row 1\]: each row must be an object"),
    ],
)
def test_read_json_errors(tmp_path, text, match):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataError, match=match) as e:
        read_rows([str(path)])
    assert str(path) in str(e.value)


def test_read_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    rows = [{"prompt": "sort : b a =", "response": "a b"}, {"prompt": "add : 1 + 2 =", "response": "3"}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    got = read_rows([str(path)])
    assert [r.data for r in got] == rows
    assert got[1].where == f"{path}[row 1]"


def test_read_rows_keeps_file_order(tmp_path):
    a = jsonl(tmp_path, [{"prompt": "1", "response": "x"}], "a.jsonl")
    b = jsonl(tmp_path, [{"prompt": "2", "response": "x"}, {"prompt": "3", "response": "x"}], "b.jsonl")
    assert [r.data["prompt"] for r in read_rows([str(b), str(a)])] == ["2", "3", "1"]


def test_read_rows_unsupported_suffix_and_missing_file(tmp_path):
    txt = tmp_path / "d.txt"
    txt.write_text("prompt,response\na,b\n")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        read_rows([str(txt)])
    with pytest.raises(DataError, match="not found") as e:
        read_rows([str(tmp_path / "missing.jsonl")])
    assert "missing.jsonl" in str(e.value)


# --- splits and loading ----------------------------------------------------------------------------------------------


def rows_n(n: int) -> list[Row]:
    return [Row({"prompt": str(i), "response": "x"}, f"f:{i + 1}") for i in range(n)]


def test_split_rows_is_deterministic_and_sized():
    rows = rows_n(100)
    train, held = split_rows(rows, 0.2, seed=3)
    assert len(held) == 20 and len(train) == 80
    assert split_rows(rows, 0.2, seed=3) == (train, held)
    assert split_rows(rows, 0.2, seed=4)[1] != held
    # Disjoint, covering, and each side in the original order.
    assert sorted(r.where for r in train + held) == sorted(r.where for r in rows)
    assert train == [r for r in rows if r in train] and held == [r for r in rows if r in held]
    assert split_rows(rows, 0.0, seed=3) == (rows, [])


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5])
def test_split_rows_rejects_bad_fractions(fraction):
    with pytest.raises(DataError, match="eval_fraction"):
        split_rows(rows_n(10), fraction, seed=0)


def test_load_sft_data_with_eval_files(tok, tmp_path):
    cfg = DataConfig(
        train_files=[str(DEMO / "sft_train.jsonl")], eval_files=[str(DEMO / "sft_eval.jsonl")], eval_fraction=0.5
    )
    train, evals, eval_rows, stats = load_sft_data(tok, cfg, seed=0, cache_dir=tmp_path)
    assert len(train) == 4000 and len(evals) == 200 and len(eval_rows) == 200  # eval_fraction ignored
    assert all("sft_eval.jsonl" in e.where for e in evals)
    assert [r.where for r in eval_rows] == [e.where for e in evals]
    assert stats["train"].kept == 4000 and stats["eval"].kept == 200


def test_load_sft_data_with_eval_fraction(tok, tmp_path):
    path = jsonl(tmp_path, [{"prompt": f"sort : {c} a =", "response": f"a {c}"} for c in "bcdefghijk"])
    cfg = DataConfig(train_files=[str(path)], eval_fraction=0.3)
    train, evals, eval_rows, _ = load_sft_data(tok, cfg, seed=1, cache_dir=tmp_path)
    assert len(train) == 7 and len(evals) == 3 and len(eval_rows) == 3
    assert not {e.where for e in train} & {e.where for e in evals}
    again = load_sft_data(tok, cfg, seed=1, cache_dir=tmp_path)
    assert [e.where for e in again[1]] == [e.where for e in evals]
    other_seed = load_sft_data(tok, cfg, seed=2, cache_dir=tmp_path)  # the split's seed is part of the cache key
    assert [e.where for e in other_seed[1]] == [r.where for r in split_rows(read_rows([str(path)]), 0.3, seed=2)[1]]


def test_load_sft_data_drops_unusable_eval_rows_from_eval_rows(tok, tmp_path):
    train = jsonl(tmp_path, [{"prompt": "a", "response": "b"}], "t.jsonl")
    ev = jsonl(tmp_path, [{"prompt": "a", "response": "b"}, LONG], "e.jsonl")
    cfg = DataConfig(train_files=[str(train)], eval_files=[str(ev)], max_length=9)
    _, evals, eval_rows, stats = load_sft_data(tok, cfg, seed=0, cache_dir=tmp_path)
    assert [r.where for r in eval_rows] == [f"{ev}:1"] == [e.where for e in evals]
    assert stats["eval"].dropped["with no response token"] == 1


def test_empty_dataset_is_an_error(tok, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=f"{empty}: no rows"):
        load_sft_data(tok, DataConfig(train_files=[str(empty)]), seed=0, cache_dir=tmp_path)
    with pytest.raises(DataError, match="data.train_files is empty"):
        load_sft_data(tok, DataConfig(), seed=0, cache_dir=tmp_path)
    # Every row dropped by truncation: no usable rows.
    long = jsonl(tmp_path, [LONG], "long.jsonl")
    with pytest.raises(DataError, match="no usable training rows"):
        load_sft_data(tok, DataConfig(train_files=[str(long)], max_length=5), seed=0, cache_dir=tmp_path)
