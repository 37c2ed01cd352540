"""Per-task probe of the demo policy and reward model: where can PPO gain, and can the RM tell right from wrong there?

    python -m benchmarks.ppo_probe --policy outputs/sft_tiny/final --reward-model outputs/rm_tiny/final
    python -m benchmarks.ppo_probe --policy outputs/ppo_tiny/final            # after PPO: what moved

For each demo task, on held-out + last train prompts: greedy exact match, sample accuracy (temperature 1) and pass@k
of the policy (headroom for RL = pass@k - greedy), and with a reward model the AUC of its score for the policy's own
correct vs wrong samples *within the task* (0.5 = the RM cannot tell them apart, so PPO can only exploit it there).
Single process, CPU is fine (~15 s for 1000 prompts).
"""

from __future__ import annotations

import argparse
import json

import torch

from distributed_pt.config import DEMO_DIR
from distributed_pt.data.collate import left_pad
from distributed_pt.data.demo import is_correct
from distributed_pt.data.io import read_rows
from distributed_pt.data.sft import encode_prompt
from distributed_pt.models.heads import Backbone, sequence_rewards
from distributed_pt.rl.engines import until_eos
from distributed_pt.rl.rollout import pack


def auc(scores: torch.Tensor, correct: torch.Tensor) -> float:
    pos, neg = scores[correct], scores[~correct]
    if not len(pos) or not len(neg):
        return float("nan")
    return ((pos[:, None] > neg[None, :]).float() + 0.5 * (pos[:, None] == neg[None, :]).float()).mean().item()


@torch.no_grad()
def probe(policy, tokenizer, rows, samples: int, reward_model=None, batch_size: int = 100, max_new_tokens: int = 12):
    eos, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    per_task: dict[str, dict[str, list]] = {}
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        prompts = [encode_prompt(tokenizer, r["prompt"]) for r in chunk]
        ids, mask = left_pad(prompts, pad_id)
        gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                   eos_token_id=eos)  # fmt: skip
        greedy = tokenizer.batch_decode(policy.generate(**gen, do_sample=False)[:, ids.size(1) :], True)
        full = [policy.generate(**gen, do_sample=True) for _ in range(samples)]
        drawn = [out[:, ids.size(1) :] for out in full]
        rm_scores = None
        if reward_model is not None:  # scored as PPO's rollouts are: re-packed, cut after the first EOS
            packed = [pack(prompts, [until_eos(d, eos) for d in out.tolist()], eos, pad_id) for out in drawn]
            rm_scores = [sequence_rewards(reward_model, seqs, attn).tolist() for seqs, attn, *_ in packed]
        for j, row in enumerate(chunk):
            t = per_task.setdefault(row["task"], {"greedy": [], "sample": [], "rm": []})
            t["greedy"].append(is_correct(row["prompt"], greedy[j]))
            t["sample"].append(
                [is_correct(row["prompt"], tokenizer.decode(d[j], skip_special_tokens=True)) for d in drawn]
            )
            if rm_scores:
                t["rm"].append([s[j] for s in rm_scores])
    table = {}
    merged = {k: [x for t in per_task.values() for x in t[k]] for k in ("greedy", "sample", "rm")}
    for task, t in [*sorted(per_task.items()), ("all", merged)]:
        ok = torch.tensor(t["sample"])
        table[task] = {
            "n": len(t["greedy"]),
            "greedy_em": sum(t["greedy"]) / len(t["greedy"]),
            "sample_acc": ok.float().mean().item(),
            f"pass@{samples}": ok.any(1).float().mean().item(),
        }
        if t["rm"]:
            table[task]["rm_auc"] = auc(torch.tensor(t["rm"]).flatten(), ok.flatten())
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True, help="a local causal LM directory (SFT or PPO final/)")
    parser.add_argument("--reward-model", help="a local RM directory (RM stage final/)")
    parser.add_argument("--prompts", type=int, default=1000, help="held-out prompts first, then the last train ones")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the table as JSON here")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.policy, local_files_only=True)
    policy = AutoModelForCausalLM.from_pretrained(args.policy, local_files_only=True).eval()
    rm = None
    if args.reward_model:
        rm = Backbone(AutoModelForSequenceClassification.from_pretrained(args.reward_model, local_files_only=True))
        rm.eval()
    held_out, train = read_rows([DEMO_DIR / "prompts_eval.jsonl"]), read_rows([DEMO_DIR / "prompts_train.jsonl"])
    rows = [r.data for r in held_out + train[::-1]][: args.prompts]
    table = probe(policy, tokenizer, rows, args.samples, rm)
    cols = list(next(iter(table.values())))
    print("| task | " + " | ".join(cols) + " |\n|" + " --- |" * (len(cols) + 1))
    for task, entry in table.items():
        print(
            f"| {task} | " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in entry.values()) + " |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"policy": args.policy, "reward_model": args.reward_model, "table": table}, f, indent=1)


if __name__ == "__main__":
    main()
