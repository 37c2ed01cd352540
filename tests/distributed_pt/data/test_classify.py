"""Labelled rows for the classify stage: class names, label ids, text (pair) tokenization, truncation, errors that name
the row, the cache, and the shipped demo files."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from distributed_pt.config import DEMO_DIR, DataConfig, ModelConfig
from distributed_pt.data import demo
from distributed_pt.data.classify import label_names, load_classify_data, tokenize_example
from distributed_pt.data.io import DataError, Row
from distributed_pt.models.loading import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig())


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_label_names(tmp_path):
    names = write(tmp_path / "n.jsonl", [{"text": "a", "label": "spam"}, {"text": "b", "label": "ham"}])
    assert label_names([names], []) == ["ham", "spam"]
    assert label_names([names], ["spam", "ham"]) == ["spam", "ham"]  # given: their order is the id order
    ids = write(tmp_path / "i.jsonl", [{"text": "a", "label": k} for k in (10, 2, 0)])
    assert label_names([ids], []) == ["0", "2", "10"]  # numbers in numeric order
    one = write(tmp_path / "one.jsonl", [{"text": "a", "label": "x"}])
    with pytest.raises(DataError, match="at least 2 classes"):
        label_names([one], [])
    bad = write(tmp_path / "bad.jsonl", [{"text": "a", "label": "x"}, {"text": "b"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing field 'label'"):
        label_names([bad], [])
    with pytest.raises(DataError, match="occurs twice"):
        label_names([names], ["a", "a"])


def test_tokenize_text_pair_labels_and_truncation(tok):
    ids = {"ham": 0, "spam": 1}
    eos = tok.eos_token_id
    ex, truncated = tokenize_example(tok, Row({"text": "cat dog", "label": "spam"}, "f:1"), 16, "right", ids)
    assert ex.input_ids == tok("cat dog")["input_ids"] + [eos] and ex.label == 1 and not truncated
    pair, _ = tokenize_example(tok, Row({"text": "cat", "text_pair": "dog", "label": 0}, "f:2"), 16, "right", ids)
    assert pair.input_ids == [tok.convert_tokens_to_ids("cat"), eos, tok.convert_tokens_to_ids("dog"), eos]
    assert pair.label == 0  # an int label indexes the names
    row = Row({"text": "a b c d e f", "label": "ham"}, "f:3")
    right, truncated = tokenize_example(tok, row, 4, "right", ids)
    left, _ = tokenize_example(tok, row, 4, "left", ids)
    assert truncated and tok.convert_ids_to_tokens(right.input_ids) == ["a", "b", "c", "<eos>"]
    assert tok.convert_ids_to_tokens(left.input_ids) == ["d", "e", "f", "<eos>"]  # the EOS pooling reads stays
    with pytest.raises(DataError, match=r"f:3: 7 tokens is longer than data.max_length=4"):
        tokenize_example(tok, row, 4, "error", ids)
    with pytest.raises(DataError, match=r"f:4: label 'eggs' is not one of the classes \['ham', 'spam'\]"):
        tokenize_example(tok, Row({"text": "a", "label": "eggs"}, "f:4"), 8, "right", ids)
    with pytest.raises(DataError, match=r"f:5: label id 2 is out of range for 2 classes"):
        tokenize_example(tok, Row({"text": "a", "label": 2}, "f:5"), 8, "right", ids)
    with pytest.raises(DataError, match=r"f:6: field 'text' must be a string"):
        tokenize_example(tok, Row({"prompt": "a", "label": 1}, "f:6"), 8, "right", ids)
    numeric, _ = tokenize_example(tok, Row({"text": "a", "label": 10}, "f:7"), 8, "right", {"2": 0, "10": 1})
    assert numeric.label == 1  # an int that is a class name is that class


def test_cached_dataset_and_its_errors(tok, tmp_path):
    train = write(tmp_path / "t.jsonl", [{"text": "cat dog", "label": "b"}, {"text": "a b", "label": "a"}])
    data = DataConfig(train_files=[train], eval_fraction=0.0, max_length=8)
    first, _, stats = load_classify_data(tok, data, 0, ["a", "b"], tmp_path / "cache")
    assert [e.label for e in first] == [1, 0] and stats["train"].kept == 2 and first[0].where.endswith("t.jsonl:1")
    swapped, _, _ = load_classify_data(tok, data, 0, ["b", "a"], tmp_path / "cache")
    assert [e.label for e in swapped] == [0, 1]  # the class names are part of the cache key
    bad = write(tmp_path / "bad.jsonl", [{"text": "cat", "label": "a"}, {"text": "dog", "label": "zebra"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: label 'zebra'"):
        load_classify_data(tok, DataConfig(train_files=[bad]), 0, ["a", "b"], tmp_path / "cache")


def test_shipped_demo_is_reproducible_clean_in_eval_and_in_vocabulary(tok, tmp_path):
    paths = demo.write_classify_data(tmp_path)
    for path in paths:
        assert path.read_bytes() == (DEMO_DIR / path.name).read_bytes(), path.name
    train, evals = ([json.loads(line) for line in p.read_text().splitlines()] for p in paths)
    assert not {r["text"] for r in train} & {r["text"] for r in evals}
    assert Counter(r["label"] for r in evals) == {name: 100 for name in demo.TASKS}
    assert all(("+" in r["text"].split()) == (r["label"] == "add") for r in evals)  # eval labels are clean
    names = list(demo.TASKS)  # rows are drawn from the tasks in turn; LABEL_NOISE of the training labels flipped
    flipped = sum(r["label"] != names[i % len(names)] for i, r in enumerate(train)) / len(train)
    assert abs(flipped - demo.LABEL_NOISE) < 0.015
    assert all(r["label"] == names[i % len(names)] for i, r in enumerate(evals))
    ids = [t for r in train + evals for t in tok(r["text"])["input_ids"]]
    assert tok.unk_token_id not in ids
