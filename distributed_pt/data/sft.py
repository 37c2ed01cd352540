"""SFT examples: rows → token ids with labels masked to -100 everywhere except response tokens.

Row kinds (local jsonl/json/parquet):
  * ``{"prompt": str, "response": str}`` → ``tok(prompt)`` (with the tokenizer's own special tokens, e.g. BOS) then
    ``tok(response) + [eos]``; labels cover the response and the EOS.
  * ``{"messages": [{"role": ..., "content": ...}, ...]}`` → rendered with the tokenizer's chat template, or with
    ``DEFAULT_CHAT_TEMPLATE`` when it has none; labels cover every assistant message (its content and end token).

Truncation to ``max_length`` (``data.truncation``):
  * ``right`` (default): keep the first ``max_length`` tokens; a row left with no response token is dropped and counted.
  * ``left``: keep the last ``max_length`` tokens (drops the start of the prompt, keeps the end of the response).
  * ``error``: a longer row is an error naming its file and line.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from distributed_pt.data.io import DataError, Row, read_rows

IGNORE_INDEX = -100

# Used when a tokenizer has no chat template of its own. Each message is "<|role|>\n" + content; an assistant message
# ends with the EOS token, other messages with a newline. A generation prompt ends with "<|assistant|>\n".
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    where: str


@dataclass
class DatasetStats:
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        drops = ", ".join(f"{n} {why}" for why, n in self.dropped.items()) or "none"
        return f"{self.kept}/{self.rows} rows kept, {self.truncated} truncated, dropped: {drops}"


def chat_template(tokenizer) -> str:
    return tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(
        messages, chat_template=chat_template(tokenizer), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Token ids of a prompt as the model sees it before its response (used in training and generation alike)."""
    if isinstance(prompt, list):
        return render_chat(tokenizer, prompt, add_generation_prompt=True)
    return tokenizer(prompt)["input_ids"]


def encode_row(tokenizer, row: Row) -> tuple[list[int], list[int]]:
    """Validate one row and return (input_ids, labels) before truncation."""
    d = row.data
    if "messages" in d:
        return _encode_chat(tokenizer, check_messages(d["messages"], row.where, "messages"), row.where)
    for key in ("prompt", "response"):
        if key not in d:
            raise DataError(f"{row.where}: missing field '{key}' (a row needs 'prompt' and 'response', or 'messages')")
        if not isinstance(d[key], str):
            raise DataError(f"{row.where}: field '{key}' must be a string, got {type(d[key]).__name__}")
    prompt = encode_prompt(tokenizer, d["prompt"])
    response = tokenizer(d["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + response, [IGNORE_INDEX] * len(prompt) + response


def check_messages(messages, where: str, key: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field '{key}' must be a non-empty list of {{'role', 'content'}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {key}[{i}] must be an object with string 'role' and 'content', got {m!r}")
    return messages


def _encode_chat(tokenizer, messages: list[dict], where: str) -> tuple[list[int], list[int]]:
    ids = render_chat(tokenizer, messages)
    labels = [IGNORE_INDEX] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise DataError(f"{where}: the conversation starts with an assistant message (nothing to respond to)")
        start = len(render_chat(tokenizer, messages[:i], add_generation_prompt=True))
        end_ids = render_chat(tokenizer, messages[: i + 1])
        if ids[: len(end_ids)] != end_ids:
            raise DataError(
                f"{where}: the chat template does not render a conversation as a prefix of its continuation"
            )
        labels[start : len(end_ids)] = ids[start : len(end_ids)]
    return ids, labels


def truncate(ids: list[int], labels: list[int], max_length: int, policy: str, where: str):
    if len(ids) <= max_length:
        return ids, labels
    if policy == "error":
        raise DataError(f"{where}: {len(ids)} tokens is longer than data.max_length={max_length}")
    if policy == "left":
        return ids[-max_length:], labels[-max_length:]
    return ids[:max_length], labels[:max_length]


def build_examples(tokenizer, rows: list[Row], max_length: int, truncation: str) -> tuple[list[Example], DatasetStats]:
    stats = DatasetStats(rows=len(rows))
    examples = []
    for row in rows:
        ids, labels = encode_row(tokenizer, row)
        if len(ids) > max_length:
            stats.truncated += 1
            ids, labels = truncate(ids, labels, max_length, truncation, row.where)
        if all(lab == IGNORE_INDEX for lab in labels):
            stats.dropped["with no response token"] += 1
            continue
        examples.append(Example(ids, labels, row.where))
    stats.kept = len(examples)
    return examples, stats


def split_rows(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Seeded random split: (train, eval) with round(fraction * len) eval rows."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"data.eval_fraction must be in [0, 1), got {fraction}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = round(fraction * len(rows))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def load_sft_data(tokenizer, data_cfg, seed: int):
    """Read, split, tokenize and mask. Returns (train, eval, eval_rows, stats) — eval_rows feed exact-match eval."""
    rows = read_rows(data_cfg.train_files)
    if data_cfg.eval_files:
        eval_rows = read_rows(data_cfg.eval_files)
    else:
        rows, eval_rows = split_rows(rows, data_cfg.eval_fraction, seed)
    train, stats = build_examples(tokenizer, rows, data_cfg.max_length, data_cfg.truncation)
    evals, eval_stats = build_examples(tokenizer, eval_rows, data_cfg.max_length, data_cfg.truncation)
    kept = {e.where for e in evals}
    eval_rows = [r for r in eval_rows if r.where in kept]
    if not train:
        files = ", ".join(data_cfg.train_files) or "(data.train_files is empty)"
        raise DataError(f"no usable training rows in {files}: {stats.summary()}")
    return train, evals, eval_rows, {"train": stats, "eval": eval_stats}
