"""Prompt rows for generation: prompts as token ids, a row's prompt and reference answer, and exact match.

Rows: ``{"prompt": str, "answer"?: str}``, SFT rows ``{"prompt", "response"}`` (the response is the reference), or chat
rows ``{"messages": [...]}`` (the prompt is every message before the last assistant one, which is the reference).
"""

from __future__ import annotations

from typing import Any

from distributed_pt.config import DataConfig
from distributed_pt.data.io import DataError, Row, read_rows
from distributed_pt.data.sft import encode_prompt


def normalize(text: str) -> str:
    """Collapse whitespace: ``"  5 3\\n"`` -> ``"5 3"`` (tokens stay separated as ``tokenizer.decode`` leaves them)."""
    return " ".join(text.split())


def is_exact_match(response: str, reference: str | None) -> bool:
    """Whether a response equals the reference answer after whitespace normalisation (False with no reference)."""
    return reference is not None and normalize(response) == normalize(reference)


def prompt_and_reference(row: dict[str, Any]) -> tuple[str | list[dict], str | None]:
    """(prompt, reference answer or None) of a prompt, SFT or chat row."""
    if "messages" in row:
        answers = [i for i, m in enumerate(row["messages"]) if m["role"] == "assistant"]
        if not answers:  # a prompt-only conversation
            return row["messages"], None
        return row["messages"][: answers[-1]], row["messages"][answers[-1]]["content"]
    return row["prompt"], row.get("response", row.get("answer"))


def load_prompts(tokenizer, data: DataConfig) -> tuple[list[list[int]], list[Row], list[Row]]:
    """Train prompts as token ids (kept to their last data.max_length tokens unless truncation=error), the train
    rows they came from (reward functions read their columns) and the eval rows (read as they are)."""
    ids = []
    rows = read_rows(data.train_files)
    for row in rows:
        prompt = row.data.get("messages", row.data.get("prompt"))
        if not isinstance(prompt, str | list):
            raise DataError(f"{row.where}: a prompt row needs 'prompt' (a string) or 'messages' (a list)")
        tokens = encode_prompt(tokenizer, prompt)
        if len(tokens) > data.max_length:
            if data.truncation == "error":
                raise DataError(
                    f"{row.where}: {len(tokens)} prompt tokens is longer than data.max_length={data.max_length}"
                )
            tokens = tokens[-data.max_length :]
        ids.append(tokens)
    if not ids:
        raise DataError(f"no prompts in {', '.join(data.train_files) or '(data.train_files is empty)'}")
    return ids, rows, read_rows(data.eval_files) if data.eval_files else []
