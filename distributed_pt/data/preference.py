"""Preference pairs for reward modelling: rows → (chosen ids, rejected ids, margin).

Row kinds (in any file form `data.io` reads), tokenized by the same rules as SFT (`data.sft`):
  * ``{"prompt": str, "chosen": str, "rejected": str}`` → tok(prompt) + tok(answer) + [eos] for each answer;
  * ``{"chosen": [messages], "rejected": [messages]}`` → each conversation rendered with the chat template.
An optional numeric ``"margin"`` is read when ``reward.use_margin`` is set. Truncation follows ``data.truncation``
(``left`` keeps the end of each answer, where the reward is read). Pairs identical after tokenization and
truncation carry no preference: they are dropped and counted. `load_preference_data` tokenizes once into an Arrow
cache (`data.dataset`) that every rank memory-maps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distributed_pt.data.collate import pad
from distributed_pt.data.dataset import DatasetStats, Recipe, TokenizedDataset, load_cached
from distributed_pt.data.io import DataError, Row
from distributed_pt.data.sft import check_messages, encode_prompt, render_chat, truncate

IDENTICAL = "identical chosen and rejected"  # why DatasetStats drops a pair


@dataclass
class PairExample:
    chosen: list[int]
    rejected: list[int]
    margin: float
    where: str


def encode_pair(tokenizer, row: Row, use_margin: bool) -> tuple[list[int], list[int], float]:
    d = row.data
    for key in ("chosen", "rejected"):
        if key not in d:
            raise DataError(f"{row.where}: missing field '{key}' (a pair needs 'chosen' and 'rejected')")
    margin = 0.0
    if use_margin:
        if not isinstance(d.get("margin"), int | float) or isinstance(d.get("margin"), bool):
            raise DataError(f"{row.where}: reward.use_margin is set but field 'margin' is missing or not a number")
        margin = float(d["margin"])
    if isinstance(d["chosen"], list) or isinstance(d["rejected"], list):
        pair = [render_chat(tokenizer, check_messages(d[k], row.where, k)) for k in ("chosen", "rejected")]
        return pair[0], pair[1], margin
    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(d.get(key), str):
            raise DataError(f"{row.where}: field '{key}' must be a string (or chosen/rejected message lists)")
    prompt = encode_prompt(tokenizer, d["prompt"])
    answers = [
        tokenizer(d[k], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for k in ("chosen", "rejected")
    ]
    return prompt + answers[0], prompt + answers[1], margin


def tokenize_pair(
    tokenizer, row: Row, max_length: int, truncation: str, use_margin: bool
) -> tuple[PairExample, bool, bool]:
    """One row's pair after truncation, whether it was truncated, and whether it is dropped (identical sides)."""
    chosen, rejected, margin = encode_pair(tokenizer, row, use_margin)
    truncated = max(len(chosen), len(rejected)) > max_length
    if truncated:
        chosen = truncate(chosen, chosen, max_length, truncation, row.where)[0]
        rejected = truncate(rejected, rejected, max_length, truncation, row.where)[0]
    return PairExample(chosen, rejected, margin, row.where), truncated, chosen == rejected


def build_pairs(tokenizer, rows: list[Row], data_cfg: Any, use_margin: bool) -> tuple[list[PairExample], DatasetStats]:
    """Tokenize a few rows in memory (the cached path, `load_preference_data`, applies the same `tokenize_pair`)."""
    stats = DatasetStats(rows=len(rows))
    pairs = []
    for row in rows:
        pair, truncated, dropped = tokenize_pair(tokenizer, row, data_cfg.max_length, data_cfg.truncation, use_margin)
        stats.truncated += truncated
        if dropped:
            stats.dropped[IDENTICAL] += 1
            continue
        pairs.append(pair)
    stats.kept = len(pairs)
    return pairs, stats


def encode_batch(
    batch: dict[str, list], tokenizer, max_length: int, truncation: str, use_margin: bool
) -> dict[str, list]:
    """`Dataset.map` function: source rows (columns "row": JSON text, "where") -> chosen, rejected, margin, length
    (both sides: the tokens a pair puts through the model), truncated, dropped (a dropped pair keeps no tokens)."""
    out: dict[str, list] = {k: [] for k in ("chosen", "rejected", "margin", "length", "truncated", "dropped")}
    for text, where in zip(batch["row"], batch["where"], strict=True):
        row = Row(json.loads(text), where)
        pair, truncated, dropped = tokenize_pair(tokenizer, row, max_length, truncation, use_margin)
        out["chosen"].append([] if dropped else pair.chosen)
        out["rejected"].append([] if dropped else pair.rejected)
        out["margin"].append(pair.margin)
        out["length"].append(0 if dropped else len(pair.chosen) + len(pair.rejected))  # both sides are read
        out["truncated"].append(truncated)
        out["dropped"].append(dropped)
    return out


def load_preference_data(
    tokenizer, data_cfg: Any, seed: int, use_margin: bool, cache_dir: Path
) -> tuple[TokenizedDataset, TokenizedDataset, dict[str, DatasetStats]]:
    """Read, split and tokenize, once: the pairs are cached under `cache_dir` (see `data.dataset`).

    Returns (train, eval, {"train": stats, "eval": stats}): memory-mapped datasets of `PairExample`s (`len`, `[i]`,
    `examples(indices)`, `lengths` = the longer side's tokens). `seed` seeds the `data.eval_fraction` split.
    """
    recipe = Recipe(
        kind="preference",
        item_type=PairExample,
        encode=encode_batch,
        fn_kwargs=dict(
            tokenizer=tokenizer, max_length=data_cfg.max_length, truncation=data_cfg.truncation, use_margin=use_margin
        ),
        columns={"chosen": "ids", "rejected": "ids", "margin": "float"},
        drop_reason=IDENTICAL,
        empty="no usable preference pairs",
        settings={"use_margin": use_margin},
    )
    return load_cached(recipe, tokenizer, data_cfg, seed, cache_dir)


def collate_pairs(pairs: list[PairExample], pad_id: int):
    """One right-padded batch of 2B rows: the B chosen sequences, then the B rejected ones. Returns
    (input_ids (2B, T), attention_mask (2B, T), margin (B,))."""
    ids, mask = pad([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    return ids, mask, torch.tensor([p.margin for p in pairs])
