"""Tokenize once into an Arrow cache that every rank memory-maps.

Rank 0 streams the rows of `data.train_files` / `data.eval_files` into Arrow, tokenizes them with `Dataset.map`
(`data.num_proc` workers) and saves the kept examples under ``cache_dir/<kind>-<key>``; the other ranks wait, then
every rank opens the result with `load_from_disk` (memory-mapped: no rank keeps the rows in Python). The key is a
sha256 over everything that changes the examples (`cache_key`), so a second start with the same inputs reads the cache
and tokenizes nothing.

On disk::

    cache_dir/
      sft-<32 hex>/                     # or preference-<32 hex>; renamed into place complete, or absent
        train/                          # Dataset.save_to_disk: data-*.arrow, dataset_info.json, state.json
        eval/                           # the same columns (SFT adds "row": each source row as JSON, for exact match)
        meta.json                       # {"key": what the key hashes, "stats": {split: DatasetStats}, "seconds": ...}
      .sft-<32 hex>.tmp-<host>-<pid>/   # a build in progress, or one that crashed: never read as a cache

Columns: SFT ``input_ids`` and ``labels``, preference ``chosen``, ``rejected`` (int32 lists), ``margin`` and
``prompt_length``; both have
``where`` ("file:line" or "file[row i]") and ``length`` (tokens; the longer side of a pair).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from distributed_pt import dist
from distributed_pt.data.io import DataError, Row, files_sha256, iter_rows, resolve, row_json, tokenizer_digest

FORMAT_VERSION = 5  # bump when the cache layout or a tokenization rule changes
UNKNOWN_WARN = 0.01  # a share of unknown tokens above this is a warning in the data summary
ROWS_PER_WORKER = 2000  # a tokenization worker per this many rows at most: a process costs more than small data


@dataclass
class DatasetStats:
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count, only reasons that happened
    tokens: int = 0  # token ids in the kept rows
    unknown: int = 0  # of them, the tokenizer's unknown token (text its vocabulary does not cover)

    def summary(self) -> str:
        drops = ", ".join(f"{n} {why}" for why, n in self.dropped.items()) or "none"
        text = f"{self.kept}/{self.rows} rows kept, {self.truncated} truncated, dropped: {drops}"
        if self.unknown:
            share = self.unknown / self.tokens
            text += f", {share:.2%} of the tokens unknown to the tokenizer"
            if share > UNKNOWN_WARN:
                text += " (warning: is this the model's tokenizer, and does it cover this data?)"
        return text


@dataclass
class Recipe:
    """One kind of tokenized data. `encode` is a batched `Dataset.map` function of the columns "row" (the source row
    as JSON) and "where", called with `fn_kwargs`; it returns `columns` plus "length", "truncated" and "dropped"."""

    kind: str  # "sft" | "preference": names the cache directory
    item_type: type  # a dataclass whose fields are `columns` and "where" (Example, PairExample)
    encode: Callable[..., dict[str, list]]
    fn_kwargs: dict[str, Any]
    columns: dict[str, str]  # column -> "ids" (list of int32) | "float" | "int"
    drop_reason: str  # how DatasetStats names a dropped row
    empty: str  # the error when no training row survives, e.g. "no usable training rows"
    settings: dict[str, Any] = field(default_factory=dict)  # further settings that change the examples (key)
    keep_eval_rows: bool = False  # keep the eval split's source rows (column "row")


class TokenizedDataset:
    """One memory-mapped split: item i is `item_type(*columns of row i)` (e.g. `Example`, `PairExample`)."""

    def __init__(self, ds: Any, item_type: type) -> None:
        self.ds, self.item_type = ds, item_type
        self.names = [f.name for f in fields(item_type)]
        self._columns = ds.select_columns(self.names)
        self._lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Any:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} is out of range for {len(self)} examples")
        return self.examples([i % len(self)])[0]

    def __iter__(self) -> Iterator[Any]:
        for start in range(0, len(self), 1000):
            yield from self.examples(list(range(start, min(start + 1000, len(self)))))

    def examples(self, indices: list[int]) -> list[Any]:
        """The items at `indices`, in that order, read in one Arrow call."""
        if len(indices) == 0:
            return []
        cols = self._columns[list(indices)]  # (datasets' gather finds the record batches by binary search)
        return [self.item_type(*values) for values in zip(*(cols[n] for n in self.names), strict=True)]

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per item, shape (len,), int32 (what packing reads)."""
        if self._lengths is None:
            self._lengths = self.ds.data.table.column("length").to_numpy().astype(np.int32, copy=False)
        return self._lengths

    @property
    def cache_name(self) -> str:
        """ "<kind>-<key>/<split>": names the examples exactly (the key hashes tokenizer, files and settings)."""
        path = Path(self.ds.cache_files[0]["filename"]).parent
        return f"{path.parent.name}/{path.name}"

    def source_rows(self) -> list[Row]:
        """The source rows kept beside the examples (an SFT eval split), in order."""
        return [Row(json.loads(r), w) for r, w in zip(self.ds["row"], self.ds["where"], strict=True)]


def load_cached(
    recipe: Recipe, tokenizer: Any, data_cfg: Any, seed: int, cache_dir: Path
) -> tuple[TokenizedDataset, TokenizedDataset, dict[str, DatasetStats]]:
    """(train, eval, {"train": stats, "eval": stats}) of `data_cfg`'s files, from the cache (rank 0 builds it when
    missing while the other ranks wait). `seed` seeds the eval_fraction split.

    A `DataError` on rank 0 stops every rank with the same message; any other failure there stops the other ranks
    with a RuntimeError naming it (rank 0 raises the original).
    """
    status, error = None, None
    if dist.is_main():
        try:
            status = ("ok", str(_build_or_hit(recipe, tokenizer, data_cfg, seed, Path(cache_dir))))
        except DataError as e:
            status, error = ("data", str(e)), e
        except BaseException as e:
            status, error = ("other", f"{type(e).__name__}: {e}"), e
    kind, text = dist.broadcast_object(status)
    if error is not None:
        raise error
    if kind == "data":
        raise DataError(text)
    if kind == "other":
        raise RuntimeError(f"rank 0 failed while preparing the data: {text}")
    path = _visible(Path(text))
    from datasets import load_from_disk

    with _quiet():
        train, evals = (TokenizedDataset(load_from_disk(str(path / s)), recipe.item_type) for s in ("train", "eval"))
    meta = json.loads((path / "meta.json").read_text())
    stats = {s: DatasetStats(**{**v, "dropped": Counter(v["dropped"])}) for s, v in meta["stats"].items()}
    return train, evals, stats


def cache_key(recipe: Recipe, tokenizer: Any, data_cfg: Any, seed: int) -> dict[str, Any]:
    """What the cache directory's name hashes: the tokenizer, the files (names in order, and bytes), the settings
    that change tokenization and the split, and the format version."""
    split = not data_cfg.eval_files
    return {
        "format": FORMAT_VERSION,
        "kind": recipe.kind,
        "tokenizer": tokenizer_digest(tokenizer),
        "tokenizer_rules": _tokenizer_rules(tokenizer),
        "train_files": [str(p) for p in resolve(data_cfg.train_files)],
        "train_sha256": files_sha256(data_cfg.train_files),
        "eval_files": [str(p) for p in resolve(data_cfg.eval_files)],
        "eval_sha256": files_sha256(data_cfg.eval_files),
        "max_length": data_cfg.max_length,
        "truncation": data_cfg.truncation,
        "eval_fraction": data_cfg.eval_fraction if split else None,
        "split_seed": seed if split and data_cfg.eval_fraction > 0 else None,
        **recipe.settings,
    }


def _tokenizer_rules(tokenizer: Any) -> str:
    """What else decides token ids beyond vocabulary and template: the backend's full definition (normalizer,
    pre-tokenizer, model, post-processor adding BOS, ...) and the special token ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else json.dumps(tokenizer.init_kwargs, sort_keys=True, default=str)
    ids = [type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id]
    return hashlib.sha256(json.dumps([rules, ids]).encode()).hexdigest()[:16]


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of n rows: (train indices, eval indices), each ascending, round(fraction * n) eval."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"data.eval_fraction must be in [0, 1), got {fraction}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = np.zeros(n, dtype=bool)
    held[order[: round(fraction * n)]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def _build_or_hit(recipe: Recipe, tokenizer: Any, data_cfg: Any, seed: int, cache_dir: Path) -> Path:
    if not data_cfg.train_files:
        raise DataError(f"{recipe.empty}: data.train_files is empty")
    key = cache_key(recipe, tokenizer, data_cfg, seed)
    final = cache_dir / f"{recipe.kind}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]}"
    if (final / "meta.json").is_file():
        dist.print0(f"tokenized cache hit: {final}")
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_dead_builds(final)
    tmp = final.parent / f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _build(recipe, data_cfg, seed, key, final.name, tmp)
        try:
            os.rename(tmp, final)  # atomic: the cache appears whole or not at all
        except OSError:
            if not (final / "meta.json").is_file():
                raise
            shutil.rmtree(tmp)  # another run built the same cache first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _build(recipe: Recipe, data_cfg: Any, seed: int, key: dict[str, Any], name: str, tmp: Path) -> None:
    scratch = tmp / "scratch"  # source rows as Arrow and map's outputs; deleted before the rename
    scratch.mkdir(parents=True)
    start = time.monotonic()
    with _quiet():
        rows = _rows_dataset(data_cfg.train_files, scratch / "train_rows.arrow")
        eval_rows = _rows_dataset(data_cfg.eval_files, scratch / "eval_rows.arrow") if data_cfg.eval_files else None
        n = len(rows) + (len(eval_rows) if eval_rows is not None else 0)
        workers = max(1, min(data_cfg.num_proc or min(8, os.cpu_count() or 1), n // ROWS_PER_WORKER))
        dist.print0(f"tokenizing {n} rows with {workers} workers -> {tmp.parent / name}")
        train = _tokenize(recipe, rows, workers, f"{name}-train")
        if eval_rows is None:
            train_idx, eval_idx = split_indices(len(rows), data_cfg.eval_fraction, seed)
            evals = train
        else:
            evals = _tokenize(recipe, eval_rows, workers, f"{name}-eval")
            train_idx, eval_idx = np.arange(len(train)), np.arange(len(evals))
        stats = {"train": _select(recipe, train, train_idx, False), "eval": _select(recipe, evals, eval_idx, True)}
        if stats["train"][0].kept == 0:
            files = ", ".join(map(str, data_cfg.train_files))
            raise DataError(f"{recipe.empty} in {files}: {stats['train'][0].summary()}")
        for split, (_, ds) in stats.items():
            ds.save_to_disk(str(tmp / split), num_shards=None if len(ds) else 1)  # (0 rows: no shard otherwise)
    seconds = round(time.monotonic() - start, 3)
    meta = {"key": key, "stats": {s: {**vars(st), "dropped": dict(st.dropped)} for s, (st, _) in stats.items()}}
    meta["seconds"] = seconds
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    del rows, eval_rows, train, evals, stats  # drop the memory maps of the scratch files before deleting them
    shutil.rmtree(scratch)
    dist.print0(f"tokenized {n} rows in {seconds:.1f}s")


def _rows_dataset(paths: list[str], file: Path) -> Any:
    """Stream the source rows into an Arrow file of (row: JSON text, where) and open it memory-mapped."""
    import pyarrow as pa
    from datasets import Dataset

    schema = pa.schema([("row", pa.string()), ("where", pa.string())])
    with pa.OSFile(str(file), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        batch: list[Row] = []
        for row in iter_rows(paths):
            batch.append(row)
            if len(batch) == 1000:
                writer.write_batch(_record_batch(batch, schema))
                batch = []
        if batch:
            writer.write_batch(_record_batch(batch, schema))
    return Dataset.from_file(str(file))


def _record_batch(rows: list[Row], schema: Any) -> Any:
    import pyarrow as pa

    return pa.record_batch([[row_json(r) for r in rows], [r.where for r in rows]], schema=schema)


def _tokenize(recipe: Recipe, rows: Any, workers: int, fingerprint: str) -> Any:
    from datasets import Features, Sequence, Value

    kinds = {"ids": Sequence(Value("int32")), "float": Value("float64"), "int": Value("int32")}
    features = Features(
        {
            "row": Value("string"),
            "where": Value("string"),
            **{c: kinds[k] for c, k in recipe.columns.items()},
            "length": Value("int32"),
            "truncated": Value("bool"),
            "dropped": Value("bool"),
        }
    )
    return rows.map(
        recipe.encode,
        batched=True,
        fn_kwargs=recipe.fn_kwargs,
        features=features,
        num_proc=workers if workers > 1 else None,
        new_fingerprint=fingerprint,  # (no hashing of the tokenizer; the scratch directory is new for each build)
    )


def _select(recipe: Recipe, ds: Any, idx: np.ndarray, is_eval: bool) -> tuple[DatasetStats, Any]:
    """Count a split's truncations and drops, and keep its usable examples (with their columns only)."""
    truncated = ds.data.table.column("truncated").to_numpy()[idx]
    dropped = ds.data.table.column("dropped").to_numpy()[idx]
    keep = idx[~dropped]
    n_dropped = int(dropped.sum())
    stats = DatasetStats(len(idx), len(keep), int(truncated.sum()), Counter({recipe.drop_reason: n_dropped}))
    stats.dropped = +stats.dropped  # only reasons that happened
    stats.tokens, stats.unknown = _unknown_tokens(recipe, ds, keep)
    columns = [*recipe.columns, "where", "length"] + (["row"] if is_eval and recipe.keep_eval_rows else [])
    return stats, ds.select_columns(columns).select(keep)


def _unknown_tokens(recipe: Recipe, ds: Any, keep: np.ndarray) -> tuple[int, int]:
    """(tokens, of them the tokenizer's unknown token) in the kept rows' id columns."""
    import pyarrow as pa
    import pyarrow.compute as pc

    unk = getattr(recipe.fn_kwargs.get("tokenizer"), "unk_token_id", None)
    table = ds.data.table.take(pa.array(keep, type=pa.int64()))
    tokens = unknown = 0
    for column in (c for c, kind in recipe.columns.items() if kind == "ids" and c != "labels"):  # the inputs
        values = pc.list_flatten(table.column(column))
        tokens += len(values)
        if unk is not None:
            unknown += pc.sum(pc.equal(values, unk)).as_py() or 0
    return tokens, unknown


def _remove_dead_builds(final: Path) -> None:
    """Delete this host's temp directories of the same cache whose builder process is gone (a crash or a kill)."""
    prefix = f".{final.name}.tmp-{socket.gethostname()}-"
    for tmp in final.parent.glob(f"{prefix}*"):
        pid = tmp.name[len(prefix) :]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _visible(path: Path, wait_s: float = 60.0) -> Path:
    """Wait for rank 0's cache to show on this rank's file system (a shared one may lag)."""
    deadline = time.monotonic() + wait_s
    while not (path / "meta.json").is_file():
        if time.monotonic() > deadline:
            raise DataError(
                f"{path}: rank 0 wrote the data cache there, but this rank cannot see it; data.cache_dir "
                "(default <output_dir>/data_cache) must be on a file system that every node shares"
            )
        time.sleep(0.5)
    return path


@contextmanager
def _quiet() -> Iterator[None]:
    """No `datasets` progress bars or info logs (the build prints its own lines on rank 0)."""
    import datasets
    from datasets.utils import logging as ds_logging

    bars, level = datasets.is_progress_bar_enabled(), ds_logging.get_verbosity()
    datasets.disable_progress_bars()
    ds_logging.set_verbosity_error()
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()
