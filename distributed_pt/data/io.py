"""Read local data files into rows that remember where they came from, and digest files and tokenizers.

A `data.train_files` / `data.eval_files` entry is one of:
  * a file: ``.jsonl`` (one JSON object a line), ``.json`` (a list of objects, or ``{"data": [...]}``), ``.parquet``
    or ``.csv`` (a header line, then one row a record; every cell is read as a string);
  * a glob pattern (``data/part-*.parquet``), expanded and sorted; a pattern matching nothing is an error;
  * a directory written by `datasets.Dataset.save_to_disk` (it holds ``state.json`` and ``dataset_info.json``);
  * any other directory: every supported file directly inside it, sorted by name (e.g. a directory of parquet shards).

Every problem is a `DataError` naming the file and the line (``path:line``, for jsonl and csv) or row
(``path[row i]``, for json, parquet and saved datasets). In columnar sources (parquet, saved datasets) a null cell
counts as an absent field, so one table can mix prompt/response and messages rows.
"""

from __future__ import annotations

import csv
import datetime
import decimal
import glob
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed_pt.paths import resolve_path

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
SAVED_DATASET_FILES = ("state.json", "dataset_info.json")  # what `Dataset.save_to_disk` writes beside its .arrow
_BATCH = 1000  # rows per parquet / saved-dataset read


class DataError(ValueError):
    """A dataset problem; the message names the file and line (or row)."""


@dataclass
class Row:
    data: dict[str, Any]
    where: str  # "path:line" for jsonl and csv, "path[row i]" otherwise


def resolve(paths: list[str]) -> list[Path]:
    """Expand config entries into the sources to read, in order: files, and directories written by `save_to_disk`.

    Raises `DataError` for a missing path, a glob matching nothing, a directory with no supported file, or an
    unsupported suffix.
    """
    out: list[Path] = []
    for entry in paths:
        entry = str(entry)
        if glob.has_magic(entry):
            matches = sorted(glob.glob(entry, recursive=True))
            if not matches:
                raise DataError(f"no files match the pattern '{entry}'")
            for m in matches:
                out += _resolve_one(Path(m))
        else:
            out += _resolve_one(resolve_path(entry))  # the bundled demo files from any working directory
    return out


def _resolve_one(p: Path) -> list[Path]:
    if p.is_dir():
        if (p / "dataset_dict.json").is_file():
            raise DataError(f"{p}: a saved DatasetDict; name one split's directory (e.g. {p / 'train'})")
        if is_saved_dataset(p):
            return [p]
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(f"{p}: a directory with no {'/'.join(SUFFIXES)} files (nor a `save_to_disk` dataset)")
        return files
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    if p.suffix.lower() not in SUFFIXES:
        raise DataError(f"{p}: unsupported file type '{p.suffix.lower()}' (use {', '.join(SUFFIXES)} or a directory)")
    return [p]


def is_saved_dataset(p: Path) -> bool:
    return all((p / name).is_file() for name in SAVED_DATASET_FILES)


def iter_rows(paths: list[str]) -> Iterator[Row]:
    """Stream every row of every source, in order (see the module docstring for the forms an entry may take).

    Raises `DataError` naming the file and line (or row) for malformed input, and for a source with no rows.
    """
    for source in resolve(paths):
        n = 0
        for n, row in enumerate(_read(source), start=1):  # noqa: B007 (n counts the rows)
            yield row
        if n == 0:
            raise DataError(f"{source}: no rows (an empty file or dataset)")


def read_rows(paths: list[str]) -> list[Row]:
    """Every row of every source, in order, as a list (for small files: eval rows, prompts). See `iter_rows`."""
    return list(iter_rows(paths))


def _read(p: Path) -> Iterator[Row]:
    if p.is_dir():
        return _read_saved(p)
    return {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}[p.suffix.lower()](
        p
    )


def _lines(p: Path) -> Iterator[tuple[int, str]]:
    """(line number, text with its line ending) of each line, decoded one at a time so errors know their line."""
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{p}:{lineno}: not valid UTF-8 ({e.reason} at column {e.start + 1})") from None


def _read_jsonl(p: Path) -> Iterator[Row]:
    for lineno, line in _lines(p):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{p}:{lineno}: each line must be a JSON object, got {type(obj).__name__}")
        yield Row(obj, f"{p}:{lineno}")


def _read_json(p: Path) -> Iterator[Row]:
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError(f"{p}: expected a list of row objects (or {{'data': [...]}})")
    for i, r in enumerate(obj):
        if not isinstance(r, dict):
            raise DataError(f"{p}[row {i}]: each row must be an object, got {type(r).__name__}")
        yield Row(r, f"{p}[row {i}]")


def _read_csv(p: Path) -> Iterator[Row]:
    reader = csv.reader((text for _, text in _lines(p)), strict=True)
    header: list[str] | None = None
    try:
        for record in reader:
            if not record:
                continue  # a blank line
            if header is None:
                header = record
                continue
            where = f"{p}:{reader.line_num}"
            if len(record) != len(header):
                raise DataError(f"{where}: {len(record)} fields, but the header has {len(header)}")
            yield Row(dict(zip(header, record, strict=True)), where)
    except csv.Error as e:
        raise DataError(f"{p}:{reader.line_num}: malformed CSV ({e})") from None


def _read_parquet(p: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(p).iter_batches(batch_size=_BATCH)
        i = 0
        for batch in batches:
            for r in batch.to_pylist():
                yield Row(_present(r), f"{p}[row {i}]")
                i += 1
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{p}: not a readable parquet file ({e})") from None


def _read_saved(p: Path) -> Iterator[Row]:
    from datasets import load_from_disk

    try:
        ds = load_from_disk(str(p))
    except Exception as e:  # noqa: BLE001 (any failure to open it is a data problem naming the directory)
        raise DataError(f"{p}: not a readable `save_to_disk` dataset ({type(e).__name__}: {e})") from None
    i = 0
    for batch in ds.iter(batch_size=_BATCH):
        for values in zip(*batch.values(), strict=True):
            yield Row(_present(dict(zip(batch, values, strict=True))), f"{p}[row {i}]")
            i += 1


def _present(row: dict[str, Any]) -> dict[str, Any]:
    """A columnar row without its null cells: a null means the field is absent from this row."""
    return {k: v for k, v in row.items() if v is not None}


def row_json(row: Row) -> str:
    """A row's data as one JSON string (dates and decimals from columnar files become strings)."""

    def default(obj: Any) -> Any:
        if isinstance(obj, datetime.date | datetime.time | datetime.timedelta | decimal.Decimal):
            return str(obj)
        raise DataError(f"{row.where}: a value of type {type(obj).__name__} cannot be read as JSON")

    return json.dumps(row.data, ensure_ascii=False, default=default)


# --- digests: what the tokenized cache and the resume check compare -------------------------------------------------


def source_files(source: Path) -> list[Path]:
    """The files whose bytes make up a source: the file itself, or a saved dataset's files sorted by name."""
    return sorted(f for f in source.iterdir() if f.is_file()) if source.is_dir() else [source]


def files_sha256(paths: list[str]) -> str:
    """Full sha256 hex digest of the bytes of every file the entries expand to, concatenated in order."""
    h = hashlib.sha256()
    for source in resolve(paths):
        for f in source_files(source):
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()


def files_digest(paths: list[str]) -> str:
    """16-hex-char digest of the data (`engine.loop.fingerprint`'s "training data"): the sha256 of the bytes of the
    files `paths` expand to (globs and directories in their sorted order), concatenated."""
    return files_sha256(paths)[:16]


def tokenizer_digest(tokenizer: Any) -> str:
    """16-hex-char digest of the vocabulary and chat template (`engine.loop.fingerprint`'s "tokenizer")."""
    vocab = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.chat_template or ""])
    return hashlib.sha256(vocab.encode()).hexdigest()[:16]
