"""Generation from a (DeepSpeed-wrapped) causal LM: sampled rollouts and greedy held-out exact match.

Under ZeRO-3 the whole model is gathered once per call (not per token) and every rank keeps stepping until all are
done (`synced_gpus`), so ranks whose sequences end early stay in step with the collective gathers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from distributed_pt import dist
from distributed_pt.data.collate import left_pad
from distributed_pt.data.io import Row
from distributed_pt.data.prompts import is_exact_match, prompt_and_reference
from distributed_pt.data.sft import encode_prompt
from distributed_pt.models.zero import gathered, unwrap

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from transformers import PreTrainedTokenizerBase


@torch.no_grad()
def generate(
    engine: DeepSpeedEngine,
    prompts: list[list[int]],
    tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int,
    sample: bool,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad `prompts` and generate. Returns (sequences (B, P + R), prompt attention mask (B, P))."""
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    kwargs = {"do_sample": True, "temperature": temperature, "top_p": top_p} if sample else {"do_sample": False}
    model = unwrap(engine)
    was_training = model.training
    model.eval()
    with gathered(model.parameters()):
        out = model.generate(
            input_ids=ids.to(engine.device),
            attention_mask=mask.to(engine.device),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            synced_gpus=engine.zero_optimization_stage() == 3,
            use_cache=True,
            **kwargs,
        )
    model.train(was_training)
    return out, mask.to(engine.device)


def greedy_answers(
    engine: DeepSpeedEngine, rows: list[Row], tokenizer: PreTrainedTokenizerBase, batch_size: int, max_new_tokens: int
) -> list[tuple[dict, str]]:
    """Greedy responses for this rank's equal share of `rows` (a remainder under world size is left out)."""
    mine = dist.equal_share(rows)
    results = []
    for i in range(0, len(mine), batch_size):
        chunk = [r.data for r in mine[i : i + batch_size]]
        prompts = [encode_prompt(tokenizer, prompt_and_reference(r)[0]) for r in chunk]
        out, mask = generate(engine, prompts, tokenizer, max_new_tokens, sample=False)
        texts = tokenizer.batch_decode(out[:, mask.size(1) :], skip_special_tokens=True)
        results.extend(zip(chunk, texts, strict=True))
    return results


def exact_match(answers: list[tuple[dict, str]]) -> float:
    """The fraction (over all ranks) of responses equal to the row's reference, whitespace-normalised."""
    return exact_match_by_task(answers, [])["eval/exact_match"]


def exact_match_by_task(answers: list[tuple[dict, str]], tasks: list[str]) -> dict[str, float]:
    """`exact_match` overall ("eval/exact_match") and over the rows of each of `tasks` (their "task" column;
    "eval/exact_match/<task>"). `tasks` must be the same list on every rank (e.g. from all eval rows)."""
    counts = torch.zeros(1 + len(tasks), 2, dtype=torch.float64)  # hits, rows
    for row, text in answers:
        hit = float(is_exact_match(text, prompt_and_reference(row)[1]))
        for k in [0] + ([1 + tasks.index(row["task"])] if row.get("task") in tasks else []):
            counts[k] += torch.tensor([hit, 1.0], dtype=torch.float64)
    counts = dist.all_reduce_sum(counts).tolist()
    names = ["eval/exact_match", *(f"eval/exact_match/{t}" for t in tasks)]
    return {name: hit / max(n, 1) for name, (hit, n) in zip(names, counts, strict=True) if n or not tasks}
