"""Path forms (globs, directories of shards, saved datasets, csv), empty sources, and the digests the resume check and
the tokenized cache share."""

from __future__ import annotations

import json

import pytest

from distributed_pt.config import ModelConfig
from distributed_pt.data.io import DataError, files_digest, read_rows, resolve, tokenizer_digest
from distributed_pt.models.loading import load_tokenizer
from tests.conftest import DEMO

ROWS = [{"prompt": f"sort : {c} a =", "response": f"a {c}"} for c in "bcdefg"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_glob_is_expanded_and_sorted(tmp_path):
    for i, part in enumerate([ROWS[:2], ROWS[2:5], ROWS[5:]]):
        write_jsonl(tmp_path / f"part-{2 - i}.jsonl", part)  # written in reverse name order
    got = read_rows([str(tmp_path / "part-*.jsonl")])
    assert [r.where.split("/")[-1] for r in got][:2] == ["part-0.jsonl:1", "part-1.jsonl:1"]
    assert [r.data for r in got] == ROWS[5:] + ROWS[2:5] + ROWS[:2]


def test_a_glob_matching_nothing_names_the_pattern(tmp_path):
    with pytest.raises(DataError, match=r"no files match the pattern '.*nope-\*\.jsonl'"):
        read_rows([str(tmp_path / "nope-*.jsonl")])


def test_a_directory_of_parquet_shards(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_parquet(shards / "part-00001.parquet", ROWS[3:])
    write_parquet(shards / "part-00000.parquet", ROWS[:3])
    (shards / "_SUCCESS").write_text("")  # other files are not data
    got = read_rows([str(shards)])
    assert [r.data for r in got] == ROWS
    assert got[3].where == f"{shards / 'part-00001.parquet'}[row 0]"


def test_a_save_to_disk_directory(tmp_path):
    from datasets import Dataset

    mixed = [{"prompt": "p", "response": "r", "messages": None}, {"messages": [{"role": "user", "content": "u"}]}]
    Dataset.from_list([{"prompt": None, "response": None, **r} for r in mixed]).save_to_disk(str(tmp_path / "saved"))
    assert resolve([str(tmp_path / "saved")]) == [tmp_path / "saved"]
    got = read_rows([str(tmp_path / "saved")])
    assert [r.data for r in got] == [{"prompt": "p", "response": "r"}, mixed[1]]  # a null cell is an absent field
    assert got[1].where == f"{tmp_path / 'saved'}[row 1]"


def test_csv_cells_are_strings_with_line_numbers(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,response\n"sort : b a =",a b\n\n"add : 1 + 2 =","3"\n"multi\nline",x\n')
    got = read_rows([str(path)])
    assert [r.data for r in got] == [
        {"prompt": "sort : b a =", "response": "a b"},
        {"prompt": "add : 1 + 2 =", "response": "3"},
        {"prompt": "multi\nline", "response": "x"},
    ]
    assert [r.where for r in got] == [f"{path}:2", f"{path}:4", f"{path}:6"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("prompt,response\na,b,c\n", r":2: 3 fields, but the header has 2"),
        ('prompt,response\na,b\n"a"b,c\n', r":3: malformed CSV \(',' expected after '\"'\)"),
    ],
)
def test_csv_errors_name_the_line(tmp_path, text, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=match) as e:
        read_rows([str(path)])
    assert str(path) in str(e.value)


@pytest.mark.parametrize("name", ["empty.jsonl", "blank.jsonl", "empty.json", "header.csv", "empty.parquet"])
def test_a_source_with_no_rows_is_an_error_naming_it(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), path)
    else:
        path.write_text({"empty.jsonl": "", "blank.jsonl": "\n \n", "empty.json": "[]", "header.csv": "a,b\n"}[name])
    with pytest.raises(DataError, match=f"{path}: no rows"):
        read_rows([str(write_jsonl(tmp_path / "ok.jsonl", ROWS)), str(path)])


def test_a_directory_without_data_files_and_an_unsupported_suffix(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="a directory with no .jsonl/.json/.parquet/.csv files"):
        read_rows([str(tmp_path)])
    with pytest.raises(DataError, match=r"notes.txt: unsupported file type '.txt'"):
        read_rows([str(tmp_path / "notes.txt")])


def test_digests_match_the_resume_fingerprint(tmp_path):
    from distributed_pt.engine.loop import fingerprint

    tok = load_tokenizer(ModelConfig())
    files = [str(DEMO / "sft_train.jsonl"), str(DEMO / "sft_eval.jsonl")]
    assert fingerprint(tok, files) == {"tokenizer": tokenizer_digest(tok), "training data": files_digest(files)}
    assert len(tokenizer_digest(tok)) == len(files_digest(files)) == 16
    # A directory or glob digests its expanded files' bytes in order: the same as listing them.
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "a.jsonl", ROWS[:2])
    write_jsonl(shards / "b.jsonl", ROWS[2:])
    listed = files_digest([str(shards / "a.jsonl"), str(shards / "b.jsonl")])
    assert files_digest([str(shards)]) == files_digest([str(shards / "*.jsonl")]) == listed
