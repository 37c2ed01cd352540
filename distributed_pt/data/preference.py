"""Preference pairs for reward modelling and DPO: rows → (chosen ids, rejected ids, margin, prompt length).

Row kinds (in any file form `data.io` reads), tokenized by the same rules as SFT (`data.sft`):
  * ``{"prompt": str, "chosen": str, "rejected": str}`` → tok(prompt) + tok(answer) + [eos] for each answer;
  * ``{"chosen": [messages], "rejected": [messages]}`` → each conversation rendered with the chat template, up to
    its last end token (where SFT labels end); the prompt is the conversation before the final assistant message
    (rendered with the generation prompt) when both sides share it, else the tokens the two sides share from the start.
An optional numeric ``"margin"`` is read when ``reward.use_margin`` is set. Pairs identical after tokenization and
truncation carry no preference: they are dropped and counted. `load_preference_data` tokenizes once into an Arrow
cache (`data.dataset`) that every rank memory-maps.

Truncation to ``data.max_length``:
  * reward modelling (each side alone, as ``data.truncation`` says): ``left`` keeps the end of each side, where the
    reward is read; ``right`` keeps the start; ``error`` refuses a long pair naming its row.
  * DPO (``prompt_first``): the prompt is cut first, from its start, down to what leaves room for the longer response
    but never below min(its length, max_length // 2) tokens; then both responses lose their ends to fit. The two
    sides keep the same prompt tokens. ``error`` refuses a long pair.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError

from distributed_pt.data.collate import Batch, pad
from distributed_pt.data.dataset import DatasetStats, Recipe, TokenizedDataset, load_cached
from distributed_pt.data.io import DataError, Row
from distributed_pt.data.sft import IGNORE_INDEX, check_messages, encode_prompt, render_chat, truncate, turn_end

IDENTICAL = "identical chosen and rejected"  # why DatasetStats drops a pair


@dataclass
class PairExample:
    chosen: list[int]
    rejected: list[int]
    margin: float
    where: str
    prompt_length: int = 0  # leading tokens shared by both sides that are not response (masked out of DPO's log-probs)


def encode_pair(tokenizer, row: Row, use_margin: bool) -> tuple[list[int], list[int], float, int]:
    """Validate one row: (chosen ids, rejected ids, margin, prompt length) before truncation."""
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
        chats = [check_messages(d[k], row.where, k) for k in ("chosen", "rejected")]
        try:
            # Each side ends with its last turn's end token, as a rollout ends with EOS (a reward model reads the
            # last token): not with the newline ChatML templates write after <|im_end|>.
            rendered = [render_chat(tokenizer, c) for c in chats]
            chosen, rejected = (ids[: turn_end(tokenizer, ids)] for ids in rendered)
            return chosen, rejected, margin, _chat_prompt_length(tokenizer, chats, chosen, rejected)
        except TemplateError as e:
            raise DataError(f"{row.where}: the chat template failed on this conversation: {e}") from e
    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(d.get(key), str):
            raise DataError(f"{row.where}: field '{key}' must be a string (or chosen/rejected message lists)")
    prompt = encode_prompt(tokenizer, d["prompt"])
    answers = [
        tokenizer(d[k], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for k in ("chosen", "rejected")
    ]
    return prompt + answers[0], prompt + answers[1], margin, len(prompt)


def _chat_prompt_length(tokenizer, chats: list[list[dict]], chosen: list[int], rejected: list[int]) -> int:
    shared = _common_prefix(chosen, rejected)
    if chats[0][:-1] == chats[1][:-1] and chats[0][-1]["role"] == chats[1][-1]["role"] == "assistant":
        prompt = render_chat(tokenizer, chats[0][:-1], add_generation_prompt=True)
        if len(prompt) <= shared and chosen[: len(prompt)] == prompt:
            return len(prompt)
    return shared


def _common_prefix(a: list[int], b: list[int]) -> int:
    return len(os.path.commonprefix([a, b]))  # (works on any sequences, not only paths)


def truncate_prompt_first(
    chosen: list[int], rejected: list[int], prompt_length: int, max_length: int
) -> tuple[list[int], list[int], int]:
    """DPO's rule (module docstring): cut the shared prompt's start, then the responses' ends. Returns (chosen,
    rejected, prompt length) after the cut."""
    prompt, answers = chosen[:prompt_length], (chosen[prompt_length:], rejected[prompt_length:])
    longest = max(map(len, answers))
    if len(prompt) + longest > max_length:
        keep = max(max_length - longest, min(len(prompt), max_length // 2))
        prompt = prompt[len(prompt) - keep :]
        answers = tuple(a[: max_length - len(prompt)] for a in answers)
    return prompt + answers[0], prompt + answers[1], len(prompt)


def tokenize_pair(
    tokenizer, row: Row, max_length: int, truncation: str, use_margin: bool, prompt_first: bool = False
) -> tuple[PairExample, bool, bool]:
    """One row's pair after truncation, whether it was truncated, and whether it is dropped (identical sides, or,
    under `prompt_first`, a side left without a response token)."""
    chosen, rejected, margin, prompt_length = encode_pair(tokenizer, row, use_margin)
    truncated = max(len(chosen), len(rejected)) > max_length
    if truncated and truncation == "error":
        longer = max(chosen, rejected, key=len)
        truncate(longer, longer, max_length, "error", row.where)  # raises, naming the row
    if truncated and prompt_first:
        chosen, rejected, prompt_length = truncate_prompt_first(chosen, rejected, prompt_length, max_length)
    elif truncated:
        chosen = truncate(chosen, chosen, max_length, truncation, row.where)[0]
        rejected = truncate(rejected, rejected, max_length, truncation, row.where)[0]
        prompt_length = min(prompt_length, _common_prefix(chosen, rejected))
    empty = prompt_first and min(len(chosen), len(rejected)) <= prompt_length
    pair = PairExample(chosen, rejected, margin, row.where, prompt_length)
    return pair, truncated, chosen == rejected or empty


def build_pairs(
    tokenizer, rows: list[Row], data_cfg: Any, use_margin: bool, prompt_first: bool = False
) -> tuple[list[PairExample], DatasetStats]:
    """Tokenize a few rows in memory (the cached path, `load_preference_data`, applies the same `tokenize_pair`)."""
    stats = DatasetStats(rows=len(rows))
    pairs = []
    for row in rows:
        args = (data_cfg.max_length, data_cfg.truncation, use_margin, prompt_first)
        pair, truncated, dropped = tokenize_pair(tokenizer, row, *args)
        stats.truncated += truncated
        if dropped:
            stats.dropped[IDENTICAL] += 1
            continue
        pairs.append(pair)
    stats.kept = len(pairs)
    return pairs, stats


def encode_batch(
    batch: dict[str, list], tokenizer, max_length: int, truncation: str, use_margin: bool, prompt_first: bool
) -> dict[str, list]:
    """`Dataset.map` function: source rows (columns "row": JSON text, "where") -> chosen, rejected, margin,
    prompt_length, length (both sides: the tokens a pair puts through the model), truncated, dropped (a dropped pair
    keeps no tokens)."""
    keys = ("chosen", "rejected", "margin", "prompt_length", "length", "truncated", "dropped")
    out: dict[str, list] = {k: [] for k in keys}
    for text, where in zip(batch["row"], batch["where"], strict=True):
        row = Row(json.loads(text), where)
        pair, truncated, dropped = tokenize_pair(tokenizer, row, max_length, truncation, use_margin, prompt_first)
        out["chosen"].append([] if dropped else pair.chosen)
        out["rejected"].append([] if dropped else pair.rejected)
        out["margin"].append(pair.margin)
        out["prompt_length"].append(pair.prompt_length)
        out["length"].append(0 if dropped else len(pair.chosen) + len(pair.rejected))  # both sides are read
        out["truncated"].append(truncated)
        out["dropped"].append(dropped)
    return out


def load_preference_data(
    tokenizer, data_cfg: Any, seed: int, use_margin: bool, cache_dir: Path, prompt_first: bool = False
) -> tuple[TokenizedDataset, TokenizedDataset, dict[str, DatasetStats]]:
    """Read, split and tokenize, once: the pairs are cached under `cache_dir` (see `data.dataset`). `prompt_first`:
    DPO's truncation rule, and a pair with a side left without response tokens is dropped.

    Returns (train, eval, {"train": stats, "eval": stats}): memory-mapped datasets of `PairExample`s (`len`, `[i]`,
    `examples(indices)`, `lengths` = the longer side's tokens). `seed` seeds the `data.eval_fraction` split.
    """
    recipe = Recipe(
        kind="preference",
        item_type=PairExample,
        encode=encode_batch,
        fn_kwargs=dict(
            tokenizer=tokenizer,
            max_length=data_cfg.max_length,
            truncation=data_cfg.truncation,
            use_margin=use_margin,
            prompt_first=prompt_first,
        ),
        columns={"chosen": "ids", "rejected": "ids", "margin": "float", "prompt_length": "int"},
        drop_reason=IDENTICAL if not prompt_first else f"{IDENTICAL} or without a response token",
        empty="no usable preference pairs",
        settings={"use_margin": use_margin, "prompt_first": prompt_first},
    )
    return load_cached(recipe, tokenizer, data_cfg, seed, cache_dir)


def collate_pairs(pairs: list[PairExample], pad_id: int):
    """One right-padded batch of 2B rows: the B chosen sequences, then the B rejected ones. Returns
    (input_ids (2B, T), attention_mask (2B, T), margin (B,))."""
    ids, mask = pad([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    return ids, mask, torch.tensor([p.margin for p in pairs])


def collate_dpo_pairs(pairs: list[PairExample], pad_id: int) -> tuple[Batch, torch.Tensor, torch.Tensor]:
    """`collate_pairs`' 2B right-padded rows (chosen, then rejected) for DPO. Returns (batch, response (2B, T) bool:
    position j with prompt_length <= j < the side's length, segment (2B, T): the sequence each position belongs to,
    0..B-1 the chosen sides and B..2B-1 the rejected ones, as `data.packing.collate_packed_dpo` numbers them)."""
    ids, mask = pad([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    starts = torch.tensor([p.prompt_length for p in pairs] * 2)
    positions = torch.arange(ids.size(1))
    response = (positions >= starts[:, None]) & mask.bool()
    segment = torch.arange(len(ids))[:, None].expand_as(ids)
    return Batch(ids, mask, torch.full_like(ids, IGNORE_INDEX)), response, segment
