"""Preference pairs for reward modelling: rows → (chosen ids, rejected ids, margin).

Row kinds (local jsonl/json/parquet), tokenized by the same rules as SFT (`data.sft`):
  * ``{"prompt": str, "chosen": str, "rejected": str}`` → tok(prompt) + tok(answer) + [eos] for each answer;
  * ``{"chosen": [messages], "rejected": [messages]}`` → each conversation rendered with the chat template.
An optional numeric ``"margin"`` is read when ``reward.use_margin`` is set. Truncation follows ``data.truncation``
(``left`` keeps the end of each answer, where the reward is read). Pairs identical after tokenization and
truncation carry no preference: they are dropped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distributed_pt.data.collate import pad
from distributed_pt.data.io import DataError, Row, read_rows
from distributed_pt.data.sft import DatasetStats, check_messages, encode_prompt, render_chat, split_rows, truncate


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


def build_pairs(tokenizer, rows: list[Row], data_cfg, use_margin: bool) -> tuple[list[PairExample], DatasetStats]:
    stats = DatasetStats(rows=len(rows))
    pairs = []
    for row in rows:
        chosen, rejected, margin = encode_pair(tokenizer, row, use_margin)
        if max(len(chosen), len(rejected)) > data_cfg.max_length:
            stats.truncated += 1
            chosen = truncate(chosen, chosen, data_cfg.max_length, data_cfg.truncation, row.where)[0]
            rejected = truncate(rejected, rejected, data_cfg.max_length, data_cfg.truncation, row.where)[0]
        if chosen == rejected:
            stats.dropped["identical chosen and rejected"] += 1
            continue
        pairs.append(PairExample(chosen, rejected, margin, row.where))
    stats.kept = len(pairs)
    return pairs, stats


def load_preference_data(tokenizer, data_cfg, seed: int, use_margin: bool):
    """Read, split and tokenize. Returns (train pairs, eval pairs, {"train": stats, "eval": stats})."""
    rows = read_rows(data_cfg.train_files)
    if data_cfg.eval_files:
        eval_rows = read_rows(data_cfg.eval_files)
    else:
        rows, eval_rows = split_rows(rows, data_cfg.eval_fraction, seed)
    train, stats = build_pairs(tokenizer, rows, data_cfg, use_margin)
    evals, eval_stats = build_pairs(tokenizer, eval_rows, data_cfg, use_margin)
    if not train:
        files = ", ".join(data_cfg.train_files) or "(data.train_files is empty)"
        raise DataError(f"no usable preference pairs in {files}: {stats.summary()}")
    return train, evals, {"train": stats, "eval": eval_stats}


def collate_pairs(pairs: list[PairExample], pad_id: int):
    """One right-padded batch of 2B rows: the B chosen sequences, then the B rejected ones. Returns
    (input_ids (2B, T), attention_mask (2B, T), margin (B,))."""
    ids, mask = pad([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    return ids, mask, torch.tensor([p.margin for p in pairs])
