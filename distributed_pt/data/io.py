"""Read local jsonl / json / parquet files into rows that remember where they came from."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A dataset problem; the message names the file and line (or row)."""


@dataclass
class Row:
    data: dict[str, Any]
    where: str  # "path:line" for jsonl, "path[row i]" otherwise


def read_rows(paths: list[str]) -> list[Row]:
    """Read every row of every file, in order. Malformed input raises `DataError` naming file and line."""
    rows: list[Row] = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"data file not found: {path}")
        suffix = p.suffix.lower()
        if suffix == ".jsonl":
            rows.extend(_read_jsonl(p))
        elif suffix == ".json":
            rows.extend(_read_json(p))
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            rows.extend(Row(r, f"{p}[row {i}]") for i, r in enumerate(pq.read_table(p).to_pylist()))
        else:
            raise DataError(f"{path}: unsupported file type '{suffix}' (use .jsonl, .json or .parquet)")
    return rows


def _read_jsonl(p: Path) -> list[Row]:
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{p}:{line}: not valid UTF-8 ({e.reason})") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{p}:{lineno}: each line must be a JSON object, got {type(obj).__name__}")
        rows.append(Row(obj, f"{p}:{lineno}"))
    return rows


def _read_json(p: Path) -> list[Row]:
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
    return [Row(r, f"{p}[row {i}]") for i, r in enumerate(obj)]
