"""The tokenized Arrow cache: hits and misses, file forms, errors through the cached path (also from workers and on
every rank), atomic writes, and the dataset interface the stages read."""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import shutil
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from distributed_pt.config import DataConfig, ModelConfig
from distributed_pt.data import dataset as dataset_module
from distributed_pt.data.io import DataError, read_rows
from distributed_pt.data.preference import PairExample, build_pairs, load_preference_data
from distributed_pt.data.sft import Example, build_examples, load_sft_data, split_rows
from distributed_pt.models.loading import load_tokenizer
from tests.conftest import DEMO

ROWS = [{"prompt": f"sort : {c} a =", "response": f"a {c}"} for c in "bcdefghijk"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig())


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def load(tok, tmp_path, files, **cfg):
    return load_sft_data(tok, DataConfig(train_files=[str(f) for f in files], **cfg), 0, tmp_path / "cache")


def ids(examples) -> list[tuple[list[int], list[int]]]:
    return [(e.input_ids, e.labels) for e in examples]


def caches(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "cache").iterdir())


# --- hits and misses -------------------------------------------------------------------------------------------------


def test_a_second_load_hits_the_cache(tok, tmp_path, capsys, monkeypatch):
    data = jsonl(tmp_path / "d.jsonl", ROWS)
    first = load(tok, tmp_path, [data])
    out = capsys.readouterr().out
    assert "tokenizing 10 rows with 1 workers -> " in out and "tokenized 10 rows in" in out
    (name,) = caches(tmp_path)

    from datasets import Dataset

    def no_map(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(Dataset, "map", no_map)
    second = load(tok, tmp_path, [data])
    assert capsys.readouterr().out == f"tokenized cache hit: {tmp_path / 'cache' / name}\n"
    assert ids(second[0]) == ids(first[0]) and second[3]["train"].summary() == first[3]["train"].summary()


def test_changed_bytes_or_tokenizer_miss_the_cache(tok, tmp_path):
    data = jsonl(tmp_path / "d.jsonl", ROWS)
    load(tok, tmp_path, [data])
    jsonl(data, [*ROWS[:-1], {"prompt": "sort : z a =", "response": "a z"}])
    load(tok, tmp_path, [data])
    assert len(caches(tmp_path)) == 2
    more = copy.deepcopy(tok)
    more.add_tokens(["<new>"])
    load(more, tmp_path, [data])
    load(tok, tmp_path, [data], max_length=8)
    assert len(caches(tmp_path)) == 4


# --- file forms ------------------------------------------------------------------------------------------------------


def test_every_file_form_loads_the_same_examples(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    expected = ids(load(tok, tmp_path, [jsonl(tmp_path / "all.jsonl", ROWS)])[0])
    parts, shards = tmp_path / "parts", tmp_path / "shards"
    parts.mkdir(), shards.mkdir()
    for i in range(0, 10, 4):
        jsonl(parts / f"part-{i:02d}.jsonl", ROWS[i : i + 4])
        pq.write_table(pa.Table.from_pylist(ROWS[i : i + 4]), shards / f"part-{i:02d}.parquet")
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,response\n" + "".join(f'"{r["prompt"]}","{r["response"]}"\n' for r in ROWS))
    (tmp_path / "d.json").write_text(json.dumps({"data": ROWS}))
    forms = [[parts / "part-*.jsonl"], [shards], [tmp_path / "saved"], [csv], [tmp_path / "d.json"]]
    for form in forms:
        assert ids(load(tok, tmp_path, form)[0]) == expected, form


# --- errors through the cached path ----------------------------------------------------------------------------------

GOOD = json.dumps(ROWS[0])


@pytest.mark.parametrize(
    ("lines", "where", "match"),
    [
        ([GOOD, "", '{"prompt": "a", "response": }'], ":3:", "malformed JSON"),
        ([GOOD, '{"prompt": "a"}'], ":2:", "missing field 'response'"),
        ([GOOD, GOOD, '{"prompt": 3, "response": "a"}'], ":3:", "field 'prompt' must be a string, got int"),
        ([GOOD, b'{"prompt": "caf\xe9", "response": "b"}'], ":2:", "not valid UTF-8"),
        ([], ": ", "no rows"),
    ],
)
def test_bad_input_names_file_and_line_and_leaves_no_cache(tok, tmp_path, lines, where, match):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    with pytest.raises(DataError, match=match) as e:
        load(tok, tmp_path, [jsonl(tmp_path / "ok.jsonl", ROWS), path])
    assert f"{path}{where}" in str(e.value)
    assert caches(tmp_path) == []  # nothing half-built left behind


def test_an_error_in_a_tokenization_worker_names_its_line(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_module, "ROWS_PER_WORKER", 1)
    path = jsonl(tmp_path / "d.jsonl", [*ROWS, {"prompt": "a", "response": 5}])  # in the second worker's half
    with pytest.raises(DataError, match=f"{path}:11: field 'response' must be a string"):
        load(tok, tmp_path, [path], num_proc=2)


def test_empty_train_files_and_nothing_usable(tok, tmp_path):
    with pytest.raises(DataError, match="no usable training rows: data.train_files is empty"):
        load(tok, tmp_path, [])
    with pytest.raises(DataError, match=r"no usable training rows in .*d.jsonl: 0/10 rows kept"):
        load(tok, tmp_path, [jsonl(tmp_path / "d.jsonl", ROWS)], max_length=4)
    with pytest.raises(DataError, match="no usable preference pairs"):
        pairs = jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "a"}])
        load_preference_data(tok, DataConfig(train_files=[str(pairs)]), 0, False, tmp_path / "cache")


# --- atomic writes ---------------------------------------------------------------------------------------------------


def test_a_partial_cache_left_behind_is_not_a_hit(tok, tmp_path, capsys):
    data = jsonl(tmp_path / "d.jsonl", ROWS)
    expected = ids(load(tok, tmp_path, [data])[0])
    (name,) = caches(tmp_path)
    # A crashed build (its process gone) left a complete-looking copy in its temp directory.
    tmp = tmp_path / "cache" / f".{name}.tmp-{socket.gethostname()}-{dead_pid()}"
    shutil.move(tmp_path / "cache" / name, tmp)
    capsys.readouterr()
    assert ids(load(tok, tmp_path, [data])[0]) == expected
    assert "tokenizing 10 rows" in capsys.readouterr().out
    assert caches(tmp_path) == [name]  # built again; the dead build's directory removed


def dead_pid() -> int:
    proc = multiprocessing.get_context("fork").Process(target=os._exit, args=(0,))
    proc.start()
    proc.join()
    return proc.pid


def test_a_crash_mid_build_leaves_nothing_to_hit(tok, tmp_path, monkeypatch):
    from datasets import Dataset

    real_save, saved = Dataset.save_to_disk, []

    def save_once_then_crash(self, path, **kwargs):
        if saved:
            raise OSError("disk full")
        saved.append(path)
        real_save(self, path, **kwargs)

    monkeypatch.setattr(Dataset, "save_to_disk", save_once_then_crash)
    data = jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(OSError, match="disk full"):
        load(tok, tmp_path, [data])
    assert saved and caches(tmp_path) == []
    monkeypatch.setattr(Dataset, "save_to_disk", real_save)
    assert len(load(tok, tmp_path, [data])[0]) == 10


# --- the interface the stages read -----------------------------------------------------------------------------------


def test_the_cached_examples_equal_the_in_memory_rule_on_the_demo_data(tok, tmp_path):
    """Same ids, labels, order, drops and truncations as tokenizing the rows in memory (what the code did before
    the cache), on data where both truncation and drops happen."""
    files = [str(DEMO / "sft_train.jsonl"), str(DEMO / "chat_sample.jsonl")]
    cfg = DataConfig(train_files=files, eval_fraction=0.05, max_length=10)
    train, evals, eval_rows, stats = load_sft_data(tok, cfg, 3, tmp_path / "cache")
    rows, held = split_rows(read_rows(files), 0.05, seed=3)
    want, want_stats = build_examples(tok, rows, 10, "right")
    assert list(train) == want and replace(stats["train"], tokens=0) == want_stats and want_stats.dropped
    assert stats["train"].tokens == sum(len(e.input_ids) for e in want) and stats["train"].unknown == 0
    want_eval, _ = build_examples(tok, held, 10, "right")
    assert list(evals) == want_eval
    assert [(r.data, r.where) for r in eval_rows] == [
        (r.data, r.where) for r in held if r.where in {e.where for e in want_eval}
    ]

    pref = DataConfig(train_files=[str(DEMO / "pref_train.jsonl")], max_length=12)
    pairs, _, pair_stats = load_preference_data(tok, pref, 0, False, tmp_path / "cache")
    want_pairs, want_pair_stats = build_pairs(tok, read_rows(pref.train_files), pref, False)
    assert (
        list(pairs) == want_pairs
        and replace(pair_stats["train"], tokens=0) == want_pair_stats
        and want_pair_stats.dropped
    )
    assert pair_stats["train"].tokens == sum(len(p.chosen) + len(p.rejected) for p in want_pairs)


def test_dataset_interface(tok, tmp_path):
    train = load(tok, tmp_path, [jsonl(tmp_path / "d.jsonl", ROWS)])[0]
    assert len(train) == 10 and isinstance(train[0], Example) and train[-1] == train[9]
    assert train.examples([3, 0, 3]) == [train[3], train[0], train[3]] and train.examples([]) == []
    assert train.lengths.dtype == np.int32 and train.lengths.tolist() == [len(e.input_ids) for e in train]
    with pytest.raises(IndexError):
        train[10]
    pairs = jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a b c", "rejected": "d", "margin": 2}])
    cfg = DataConfig(train_files=[str(pairs)])
    (pair,) = load_preference_data(tok, cfg, 0, True, tmp_path / "cache")[0]
    assert isinstance(pair, PairExample) and pair.margin == 2.0 and pair.where == f"{pairs}:1"
    lengths = load_preference_data(tok, cfg, 0, True, tmp_path / "cache")[0].lengths.tolist()
    assert lengths == [len(pair.chosen) + len(pair.rejected)]  # both sides go through the model


# --- two ranks -------------------------------------------------------------------------------------------------------


def _rank_main(rank: int, port: int, files: list[str], cache: str, out) -> None:
    import contextlib
    import io

    import torch.distributed as td

    td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            train = load_sft_data(load_tokenizer(ModelConfig()), DataConfig(train_files=files), 0, Path(cache))[0]
        out.put((rank, "ok", ids(train), printed.getvalue()))
    except DataError as e:
        out.put((rank, "DataError", str(e), printed.getvalue()))
    finally:
        td.destroy_process_group()


def run_two_ranks(files: list[str], cache: Path) -> dict[int, tuple]:
    from distributed_pt.dist import free_port

    ctx = multiprocessing.get_context("fork")
    out, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, files, str(cache), out)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        rank, *rest = out.get(timeout=120)
        results[rank] = tuple(rest)
    for p in procs:
        p.join(timeout=30)
    return results


def test_two_ranks_share_one_build_and_one_error(tok, tmp_path):
    data = str(jsonl(tmp_path / "d.jsonl", ROWS))
    ok = run_two_ranks([data], tmp_path / "cache")
    assert ok[0][0] == ok[1][0] == "ok" and ok[0][1] == ok[1][1] and len(ok[0][1]) == 10
    assert "tokenizing 10 rows" in ok[0][2] and ok[1][2] == ""  # rank 0 built and printed; rank 1 waited
    bad = str(jsonl(tmp_path / "bad.jsonl", [GOOD, '{"prompt": "a"}']))
    err = run_two_ranks([data, bad], tmp_path / "cache")
    assert err[0][0] == err[1][0] == "DataError" and err[0][1] == err[1][1]
    assert f"{bad}:2: missing field 'response'" in err[1][1]


def test_the_share_of_unknown_tokens_is_counted_and_warned(tok, tmp_path):
    # The demo tokenizer has no Greek letters: a tokenizer that does not cover the data turns them into <unk>.
    clean = load(tok, tmp_path, [jsonl(tmp_path / "ok.jsonl", ROWS)])[3]["train"]
    assert clean.unknown == 0 and clean.tokens > 0 and "unknown" not in clean.summary()
    rows = [{"prompt": f"sort : {c} a =", "response": "a ΩΩ"} for c in "bcdefghijk"]
    stats = load(tok, tmp_path, [jsonl(tmp_path / "greek.jsonl", rows)])[3]["train"]
    assert stats.unknown == 10 * tok(" ΩΩ")["input_ids"].count(tok.unk_token_id) > 0  # input ids only, not labels
    assert f"{stats.unknown / stats.tokens:.2%} of the tokens unknown" in stats.summary()
    assert "warning: is this the model's tokenizer" in stats.summary()
