"""Preference pairs from a policy's own samples, labelled by a programmatic checker (InstructGPT's labellers compare
model outputs; on the demo tasks a checker can do their job).

    python -m distributed_pt.data.sample_pairs --model outputs/sft_tiny/final \
        --prompts distributed_pt/assets/demo/prompts_train.jsonl --out outputs/sft_tiny/pref_samples.jsonl

For each prompt, `--samples` responses are drawn from the model. A correct one is paired against each wrong one; when
none is correct, the reference answer (the row's "answer") is the chosen side. Rows:
``{"prompt", "chosen", "rejected", "task", "kind": "policy_sample"}``. A reward model trained on its policy's own
mistakes ranks that policy's outputs far better than one trained only on synthetic corruptions (which PPO then
learns to exploit).
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
from pathlib import Path

import torch

from distributed_pt.data.collate import left_pad
from distributed_pt.data.io import read_rows
from distributed_pt.data.prompts import normalize
from distributed_pt.data.sft import encode_prompt


def load_checker(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


@torch.no_grad()
def sample_pairs(model, tokenizer, rows, checker, samples: int, max_new_tokens: int, batch_size: int, seed: int):
    torch.manual_seed(seed)
    rng = random.Random(seed)
    pairs = []
    for i in range(0, len(rows), batch_size):
        chunk = [r.data for r in rows[i : i + batch_size]]
        ids, mask = left_pad([encode_prompt(tokenizer, r["prompt"]) for r in chunk], tokenizer.pad_token_id)
        texts = []
        for _ in range(samples):
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )  # fmt: skip
            texts.append(tokenizer.batch_decode(out[:, ids.size(1) :], skip_special_tokens=True))
        for j, row in enumerate(chunk):
            answers = {normalize(t[j]) for t in texts}
            right = [a for a in answers if checker(row["prompt"], a)]
            wrong = sorted(a for a in answers if not checker(row["prompt"], a))
            chosen = right[0] if right else row["answer"]
            for rejected in wrong:
                pairs.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected, "task": row.get("task"),
                              "kind": "policy_sample"})  # fmt: skip
    rng.shuffle(pairs)
    return pairs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a local HF causal LM directory (e.g. the SFT stage's final/)")
    parser.add_argument("--prompts", required=True, help='jsonl rows with "prompt" and "answer"')
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--checker", default="distributed_pt.data.demo:is_correct", help="module:function(prompt, response)"
    )
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).eval()
    rows = read_rows([args.prompts])
    pairs = sample_pairs(model, tokenizer, rows, load_checker(args.checker), args.samples, args.max_new_tokens,
                         args.batch_size, args.seed)  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(json.dumps(p) + "\n" for p in pairs))
    print(f"{len(pairs)} pairs from {len(rows)} prompts x {args.samples} samples -> {args.out}")


if __name__ == "__main__":
    main()
