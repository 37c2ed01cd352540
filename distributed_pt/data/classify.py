"""Labelled texts for the classify stage: rows → (token ids, class id), tokenized once into the Arrow cache.

Rows (in any file form `data.io` reads): ``{"text": str, "label": ...}``, or a pair ``{"text": str, "text_pair": str,
"label": ...}``. Token ids: tok(text) + [eos] (a pair: tok(text) + [eos] + tok(text_pair) + [eos]); the final EOS is
the position last-token pooling reads. Too long a row loses the start (``data.truncation=left``) or the end
(``right``) of its text before the final EOS, or is an error naming its row (``error``).

Labels are names or ids. The class names are ``classify.labels`` when set, else the training rows' distinct labels,
sorted (numerically when every one is a number: int labels 0, 1, 2 make the names "0", "1", "2"). A name must be one
of them; an int label is the class of that name when there is one, else an index into the names. Every problem is a
`DataError` naming the file and line (or row).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distributed_pt import dist
from distributed_pt.data.collate import pad
from distributed_pt.data.dataset import DatasetStats, Recipe, TokenizedDataset, load_cached
from distributed_pt.data.io import DataError, Row, iter_rows


@dataclass
class ClassExample:
    input_ids: list[int]
    label: int
    where: str


def _raw_label(row: Row) -> str | int:
    value = row.data.get("label")
    if value is None:
        raise DataError(f"{row.where}: missing field 'label' (a row needs 'text' and 'label')")
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise DataError(f"{row.where}: field 'label' must be a class name or an int id, got {value!r}")
    return value


def label_names(train_files: list[str], given: list[str]) -> list[str]:
    """The class names in id order: `given` (``classify.labels``), else the training rows' distinct labels, sorted
    (numerically when all are numbers). Read by rank 0 and broadcast."""
    if given:
        if len(set(given)) != len(given):
            raise DataError(f"classify.labels: a name occurs twice in {given}")
        return list(given)
    names: list[str] | None = None
    error: str | None = None
    if dist.is_main():
        try:
            seen = {str(_raw_label(row)) for row in iter_rows(train_files)}
            numeric = all(n.lstrip("-").isdigit() for n in seen)
            names = sorted(seen, key=lambda n: (int(n), n) if numeric else (0, n))
        except DataError as e:
            error = str(e)
    names, error = dist.broadcast_object((names, error))
    if error is not None:
        raise DataError(error)
    if len(names) < 2:
        raise DataError(f"{', '.join(map(str, train_files))}: a classifier needs at least 2 classes, found {names}")
    return names


def label_id(row: Row, label_ids: dict[str, int]) -> int:
    """A row's class id: its name's, or its int label (an index into the names)."""
    value = _raw_label(row)
    if isinstance(value, int):
        if not 0 <= value < len(label_ids) and str(value) not in label_ids:
            raise DataError(f"{row.where}: label id {value} is out of range for {len(label_ids)} classes")
        return label_ids.get(str(value), value)
    if value not in label_ids:
        raise DataError(f"{row.where}: label {value!r} is not one of the classes {list(label_ids)}")
    return label_ids[value]


def encode_text(tokenizer: Any, row: Row) -> list[int]:
    """Token ids of a row's text (or text pair), each part followed by EOS, before truncation."""
    parts = ["text", "text_pair"] if "text_pair" in row.data else ["text"]
    ids: list[int] = []
    for key in parts:
        if not isinstance(row.data.get(key), str):
            raise DataError(f"{row.where}: field '{key}' must be a string, got {row.data.get(key)!r}")
        ids += tokenizer(row.data[key], add_special_tokens=key == "text")["input_ids"] + [tokenizer.eos_token_id]
    return ids


def tokenize_example(
    tokenizer: Any, row: Row, max_length: int, truncation: str, label_ids: dict[str, int]
) -> tuple[ClassExample, bool]:
    """One row's example after truncation (the final EOS kept), and whether it was truncated."""
    ids = encode_text(tokenizer, row)
    truncated = len(ids) > max_length
    if truncated:
        if truncation == "error":
            raise DataError(f"{row.where}: {len(ids)} tokens is longer than data.max_length={max_length}")
        body = ids[:-1]
        body = body[len(body) - (max_length - 1) :] if truncation == "left" else body[: max_length - 1]
        ids = body + ids[-1:]
    return ClassExample(ids, label_id(row, label_ids), row.where), truncated


def encode_batch(
    batch: dict[str, list], tokenizer: Any, max_length: int, truncation: str, labels: list[str]
) -> dict[str, list]:
    """`Dataset.map` function: source rows (columns "row": JSON text, "where") -> input_ids, label, length,
    truncated, dropped (never: every labelled row is kept)."""
    label_ids = {name: i for i, name in enumerate(labels)}
    out: dict[str, list] = {k: [] for k in ("input_ids", "label", "length", "truncated", "dropped")}
    for text, where in zip(batch["row"], batch["where"], strict=True):
        ex, truncated = tokenize_example(tokenizer, Row(json.loads(text), where), max_length, truncation, label_ids)
        out["input_ids"].append(ex.input_ids)
        out["label"].append(ex.label)
        out["length"].append(len(ex.input_ids))
        out["truncated"].append(truncated)
        out["dropped"].append(False)
    return out


def load_classify_data(
    tokenizer: Any, data_cfg: Any, seed: int, labels: list[str], cache_dir: Path
) -> tuple[TokenizedDataset, TokenizedDataset, dict[str, DatasetStats]]:
    """Read, split and tokenize once into the cache under `cache_dir` (see `data.dataset`; the class names are part of
    its key). Returns (train, eval, {"train": stats, "eval": stats}): memory-mapped datasets of `ClassExample`s."""
    recipe = Recipe(
        kind="classify",
        item_type=ClassExample,
        encode=encode_batch,
        fn_kwargs=dict(
            tokenizer=tokenizer, max_length=data_cfg.max_length, truncation=data_cfg.truncation, labels=labels
        ),
        columns={"input_ids": "ids", "label": "int"},
        drop_reason="unusable",
        empty="no usable labelled rows",
        settings={"labels": labels},
    )
    return load_cached(recipe, tokenizer, data_cfg, seed, cache_dir)


def collate_classes(examples: list[ClassExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids (B, T), attention_mask (B, T), labels (B,))."""
    ids, mask = pad([e.input_ids for e in examples], pad_id)
    return ids, mask, torch.tensor([e.label for e in examples], dtype=torch.long)
