"""SFT examples: rows → token ids with labels masked to -100 everywhere except response tokens.

Row kinds (in any file form `data.io` reads):
  * ``{"prompt": str, "response": str}`` → ``tok(prompt)`` (with the tokenizer's own special tokens, e.g. BOS) then
    ``tok(response) + [eos]``; labels cover the response and the EOS.
  * ``{"messages": [{"role": ..., "content": ...}, ...]}`` → rendered with the tokenizer's chat template, or with
    ``DEFAULT_CHAT_TEMPLATE`` when it has none; labels cover every assistant message (its content and end token, not
    the newline some templates write after that token). The generation prompt before each assistant message (what
    `encode_prompt` gives at eval time) must be the row's prefix there, or the row is an error naming it.

Truncation to ``max_length`` (``data.truncation``):
  * ``right`` (default): keep the first ``max_length`` tokens; a row left with no response token is dropped and counted.
  * ``left``: keep the last ``max_length`` tokens (drops the start of the prompt, keeps the end of the response).
  * ``error``: a longer row is an error naming its file and line.

`load_sft_data` tokenizes once into an Arrow cache (`data.dataset`) that every rank memory-maps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from distributed_pt.data.dataset import DatasetStats, Recipe, TokenizedDataset, load_cached, split_indices
from distributed_pt.data.io import DataError, Row

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


NO_RESPONSE = "with no response token"  # why DatasetStats drops a row


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
    try:
        ids = render_chat(tokenizer, messages)
        labels = [IGNORE_INDEX] * len(ids)
        specials = special_ids(tokenizer)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            if i == 0:
                raise DataError(f"{where}: the conversation starts with an assistant message (nothing to respond to)")
            start, end = _answer_span(tokenizer, ids, messages, i, specials, where)
            end = turn_end(tokenizer, ids, start, end, specials)
            labels[start:end] = ids[start:end]
    except TemplateError as e:  # the template's raise_exception (e.g. "roles must alternate"), or a broken template
        raise DataError(f"{where}: the chat template failed on this conversation: {e}") from e
    return ids, labels


def _answer_span(
    tokenizer, ids: list[int], messages: list[dict], i: int, specials: set[int], where: str
) -> tuple[int, int]:
    """(start, end) of assistant message i's turn in `ids`, the whole conversation rendered: from the end of the
    generation prompt before it to the end of the conversation rendered up to it."""
    prompt = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
    start = len(prompt)
    if ids[:start] != prompt:
        # Labels start at len(prompt), and eval prompts with `prompt`: both are wrong unless the row has it as its
        # prefix. Mistral v0.3's template, for one, writes the system message into the last user message only, so
        # a conversation that ends with an answer has none.
        raise DataError(
            f"{where}: the chat template's generation prompt for assistant message {i} is not how the whole "
            "conversation renders the turns before it (use a template that renders them the same way)"
        )
    upto = render_chat(tokenizer, messages[: i + 1])
    if ids[: len(upto)] == upto:
        return start, len(upto)
    # Qwen3's template writes an empty "<think>\n\n</think>\n\n" into a conversation's last assistant turn only, so
    # the turn renders differently when it ends `upto`. Its end is the same: in `ids` the turn runs to the first end
    # token after the prompt, and those tokens must be how the turn ends in `upto`.
    last = turn_end(tokenizer, upto, start, len(upto), specials)
    if upto[:start] == prompt and upto[last - 1] in specials and upto[last - 1] in ids[start:]:
        end = ids.index(upto[last - 1], start) + 1
        if end <= last and upto[last - (end - start) : last] == ids[start:end]:
            return start, end
    raise DataError(f"{where}: the chat template does not render a conversation as a prefix of its continuation")


def special_ids(tokenizer) -> set[int]:
    """Ids of the special tokens, with added ones the special-token attributes do not list (Llama 3's <|eot_id|>)."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}


def turn_end(
    tokenizer, ids: list[int], start: int = 0, end: int | None = None, specials: set[int] | None = None
) -> int:
    """`end` (default len(ids)) less the whitespace a chat template writes after a turn's end token (ChatML's
    "<|im_end|>\\n", Gemma's "<end_of_turn>\\n"): a response ends with its end token, as generation stops at it.
    `end` stays when no special token precedes that whitespace (a template whose turns end with a newline alone)."""
    end = len(ids) if end is None else end
    k = end
    while k > start and tokenizer.decode(ids[k - 1 : k]).isspace():
        k -= 1
    return k if k > start and ids[k - 1] in (special_ids(tokenizer) if specials is None else specials) else end


def truncate(ids: list[int], labels: list[int], max_length: int, policy: str, where: str):
    if len(ids) <= max_length:
        return ids, labels
    if policy == "error":
        raise DataError(f"{where}: {len(ids)} tokens is longer than data.max_length={max_length}")
    if policy == "left":
        return ids[-max_length:], labels[-max_length:]
    return ids[:max_length], labels[:max_length]


def tokenize_row(tokenizer, row: Row, max_length: int, truncation: str) -> tuple[Example, bool, bool]:
    """One row's example after truncation, whether it was truncated, and whether it is dropped (no response token
    left)."""
    ids, labels = encode_row(tokenizer, row)
    truncated = len(ids) > max_length
    if truncated:
        ids, labels = truncate(ids, labels, max_length, truncation, row.where)
    return Example(ids, labels, row.where), truncated, all(lab == IGNORE_INDEX for lab in labels)


def build_examples(tokenizer, rows: list[Row], max_length: int, truncation: str) -> tuple[list[Example], DatasetStats]:
    """Tokenize a few rows in memory (the cached path, `load_sft_data`, applies the same `tokenize_row`)."""
    stats = DatasetStats(rows=len(rows))
    examples = []
    for row in rows:
        ex, truncated, dropped = tokenize_row(tokenizer, row, max_length, truncation)
        stats.truncated += truncated
        if dropped:
            stats.dropped[NO_RESPONSE] += 1
            continue
        examples.append(ex)
    stats.kept = len(examples)
    return examples, stats


def encode_batch(batch: dict[str, list], tokenizer, max_length: int, truncation: str) -> dict[str, list]:
    """`Dataset.map` function: source rows (columns "row": JSON text, "where") -> input_ids, labels, length,
    truncated, dropped (a dropped row keeps no tokens)."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "truncated": [], "dropped": []}
    for text, where in zip(batch["row"], batch["where"], strict=True):
        ex, truncated, dropped = tokenize_row(tokenizer, Row(json.loads(text), where), max_length, truncation)
        out["input_ids"].append([] if dropped else ex.input_ids)
        out["labels"].append([] if dropped else ex.labels)
        out["length"].append(0 if dropped else len(ex.input_ids))
        out["truncated"].append(truncated)
        out["dropped"].append(dropped)
    return out


def split_rows(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Seeded random split: (train, eval) with round(fraction * len) eval rows, each in file order (the rule the
    cached path applies, `dataset.split_indices`)."""
    train, held = split_indices(len(rows), fraction, seed)
    return [rows[i] for i in train], [rows[i] for i in held]


def load_sft_data(
    tokenizer, data_cfg: Any, seed: int, cache_dir: Path
) -> tuple[TokenizedDataset, TokenizedDataset, list[Row], dict[str, DatasetStats]]:
    """Read, split, tokenize and mask, once: the examples are cached under `cache_dir` (see `data.dataset`).

    Returns (train, eval, eval_rows, {"train": stats, "eval": stats}). train/eval are memory-mapped datasets of
    `Example`s (`len`, `[i]`, `examples(indices)`, `lengths`); eval_rows are the eval rows that kept an example, in
    the same order (they feed exact-match eval). `seed` seeds the `data.eval_fraction` split.
    """
    recipe = Recipe(
        kind="sft",
        item_type=Example,
        encode=encode_batch,
        fn_kwargs={"tokenizer": tokenizer, "max_length": data_cfg.max_length, "truncation": data_cfg.truncation},
        columns={"input_ids": "ids", "labels": "ids"},
        drop_reason=NO_RESPONSE,
        empty="no usable training rows",
        keep_eval_rows=True,
    )
    train, evals, stats = load_cached(recipe, tokenizer, data_cfg, seed, cache_dir)
    return train, evals, evals.source_rows(), stats
