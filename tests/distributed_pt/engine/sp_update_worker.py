"""Run by test_sequence.py on 2 ranks (torchrun): GRPO's and PPO's losses and gradients with sequence parallelism 2
(each rank its shard of every sequence, Ulysses attention, partial sums over the shards) against the same update on
whole sequences (eval mode: the model's own attention), for every ratio level, aggregation and advantage shape;
eval mode untouched by Ulysses (left padding); a Qwen2 model too; `gather`'s rows. With `packed`: packed rows (SFT,
DPO, RM) from shards against the model's own packed-row attention, token log-probs and their gradients and a reward
model's scores at the samples' last tokens. Exits non-zero on the first mismatch."""

from __future__ import annotations

import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, Qwen2Config, Qwen2ForCausalLM

from distributed_pt import dist
from distributed_pt.config import load_config
from distributed_pt.data.packing import sample_positions
from distributed_pt.engine import sequence
from distributed_pt.losses.grpo import grpo_loss
from distributed_pt.losses.ppo import policy_loss, value_loss
from distributed_pt.models.heads import Backbone, token_scores
from distributed_pt.rl.logprobs import token_logprobs

CONFIG, B, T = sys.argv[1], 4, 23  # 23 tokens: padded to 24 for the 2 shards


def grads(loss: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])


def packed(cfg, config: LlamaConfig) -> None:
    """Packed rows (samples of 7-10 tokens; the last row's padding a segment of its own, as `collate_packed` makes
    it): each rank's shard through Ulysses and the sdpa mask built from the gathered position ids, against the whole
    rows through the model's own attention (transformers' packed-sequence mask)."""
    model, rm = Backbone(LlamaForCausalLM(config)), Backbone(LlamaForSequenceClassification(config))
    sequence.setup(model.module, cfg, packing=True)
    lengths = [[7, 9, 7], [10, 8, 5], [23], [6, 6, 6]]  # the last row: 18 tokens and 5 of padding
    pos = torch.stack([sample_positions([*n, T - sum(n)]) for n in lengths])
    ids = torch.randint(1, 97, (B, T))
    weights = torch.rand(B, T - 1) * (pos[:, 1:] > 0)  # never a sample's first token
    cut = sequence.Shard.of(cfg)
    model.eval()
    want = token_logprobs(model, ids, None, 1.0, False, pos)[0]
    want_grads = grads((want * weights).sum(), model)
    model.train()
    got = token_logprobs(model, temperature=1.0, fused=False, **cut.inputs(ids, None, position_ids=pos))[0]
    real = cut(torch.ones(B, T - 1))  # not the column added for the shards
    torch.testing.assert_close(got * real, cut(want) * real, rtol=1e-5, atol=1e-6, msg="packed log-probs")
    local = (got * cut(weights)).sum()  # a sum over tokens (SFT, DPO): each rank its shard's part
    torch.testing.assert_close(dist.all_reduce_sum(local.detach()), (want * weights).sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dist.all_reduce_sum(grads(local, model)), want_grads, rtol=1e-4, atol=1e-6)
    assert want_grads.abs().max() > 0
    ends = [(r, sum(n[: i + 1]) - 1) for r, n in enumerate(lengths) for i in range(len(n))]
    at = torch.tensor(ends)
    rm.eval()
    want = token_scores(rm, ids, None, pos)[at[:, 0], at[:, 1]]
    rm.train()
    got = sequence.sequence_rewards(rm, ids, torch.ones_like(ids), 2, pos, at)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg="packed rewards")
    # each sample sees only itself: changing the first sample of row 0 leaves the rest of the row's scores alone
    other = ids.clone()
    other[0, :7] = torch.randint(1, 97, (7,))
    moved = sequence.sequence_rewards(rm, other, torch.ones_like(ids), 2, pos, at)
    assert moved[0] != got[0] and torch.equal(moved[1:], got[1:]), (moved, got)


def main() -> None:
    dist.init_distributed()
    cfg = load_config(CONFIG, ["deepspeed.sequence_parallel_size=2", "train.micro_batch_size=4"])
    torch.manual_seed(0)  # the same model and data on both ranks
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, attn_implementation="sdpa", num_labels=1,
                         pad_token_id=0)  # fmt: skip
    if sys.argv[2:] == ["packed"]:
        packed(cfg, config)
        print(f"rank {dist.rank()}: ok", flush=True)
        return dist.destroy()
    model = Backbone(LlamaForCausalLM(config)).eval()
    left = torch.randint(1, 97, (3, 9)) * (torch.arange(9) >= torch.tensor([[0], [3], [5]]))  # left-padded prompts
    plain = token_logprobs(model, left, (left > 0).long(), 1.0, False)[0]
    sequence.setup(model.module, cfg)
    # eval mode (generation, evaluation) keeps the model's own attention and its padding mask
    torch.testing.assert_close(token_logprobs(model, left, (left > 0).long(), 1.0, False)[0], plain, rtol=0, atol=0)
    lengths = torch.tensor([23, 17, 11, 20])
    attn = (torch.arange(T) < lengths[:, None]).long()
    ids = torch.randint(1, 97, (B, T)) * attn
    mask = ((torch.arange(T - 1) >= 5) & (torch.arange(T - 1) < lengths[:, None] - 1)).float()  # completions
    noise = 0.3 * torch.randn(B, T - 1)
    ref = torch.randn(B, T - 1) * 0.1 - 3.0
    cut = sequence.Shard.of(cfg)
    for adv in (torch.randn(B), torch.randn(B, T - 1)):
        for level in ("token", "sequence", "sequence_token"):
            for loss_type in ("grpo", "dr_grpo", "dapo"):
                args = (loss_type, 0.2, 0.28)
                model.eval()  # whole sequences
                logp = token_logprobs(model, ids, attn, 0.9, False)[0]
                old = logp.detach() + noise
                want, want_stats = grpo_loss(logp, old, adv, mask, *args, ref, 0.05, T, None, level)
                want_grads = grads(want, model)
                model.train()  # Ulysses: this rank's shard
                logp = token_logprobs(model, temperature=0.9, fused=False, **cut.inputs(ids, attn))[0]
                got, got_stats = grpo_loss(logp, cut(old), cut(adv) if adv.dim() == 2 else adv, cut(mask), *args,
                                           cut(ref), 0.05, T, None, level, cut.reduce)  # fmt: skip
                got_grads = dist.all_reduce_sum(grads(got / 2, model))  # each rank 1/SP; DeepSpeed sums over shards
                case = f"rank {dist.rank()} adv {tuple(adv.shape)} {level} {loss_type}"
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=f"loss: {case}")
                torch.testing.assert_close(got_grads, want_grads, rtol=1e-4, atol=1e-6, msg=f"grads: {case}")
                for k, v in want_stats.items():
                    assert abs(got_stats[k] - v) <= 1e-5 * max(1.0, abs(v)), (case, k, got_stats[k], v)
                assert want_grads.abs().max() > 0
    # PPO: the clipped policy loss (with importance weights) and the clipped value loss
    adv, weights = torch.randn(B, T - 1), torch.rand(B, T - 1) + 0.5
    model.eval()
    logp = token_logprobs(model, ids, attn, 1.0, False)[0]
    old = logp.detach() + noise
    want, want_stats = policy_loss(logp, old, adv, mask, 0.2, weights)
    want_grads = grads(want, model)
    model.train()
    logp = token_logprobs(model, temperature=1.0, fused=False, **cut.inputs(ids, attn))[0]
    got, got_stats = policy_loss(logp, cut(old), cut(adv), cut(mask), 0.2, cut(weights), cut.reduce)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg="ppo policy loss")
    torch.testing.assert_close(dist.all_reduce_sum(grads(got / 2, model)), want_grads, rtol=1e-4, atol=1e-6)
    assert all(abs(got_stats[k] - v) <= 1e-5 * max(1.0, abs(v)) for k, v in want_stats.items()), got_stats
    values = torch.randn(B, T - 1, requires_grad=True)
    old_values, returns = values.detach() + 0.3 * torch.randn(B, T - 1), torch.randn(B, T - 1)
    want, _ = value_loss(values, old_values, returns, mask, 0.2)
    (want_grad,) = torch.autograd.grad(want, values)
    got, _ = value_loss(cut(values), cut(old_values), cut(returns), cut(mask), 0.2, cut.reduce)
    (got_grad,) = torch.autograd.grad(got / 2, values)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg="ppo value loss")
    torch.testing.assert_close(dist.all_reduce_sum(got_grad), want_grad, rtol=1e-5, atol=1e-7)

    # Qwen2 (biased q/k/v projections, GQA) through the same Ulysses attention: the GRPO objective again
    qwen = Backbone(Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                                 attn_implementation="sdpa")))  # fmt: skip
    qwen.eval()
    logp = token_logprobs(qwen, ids, attn, 1.0, False)[0]
    old = logp.detach() + noise
    want, _ = grpo_loss(logp, old, adv, mask, "grpo", 0.2, 0.28)
    want_grads = grads(want, qwen)
    qwen.train()
    logp = token_logprobs(qwen, temperature=1.0, fused=False, **cut.inputs(ids, attn))[0]
    got, _ = grpo_loss(logp, cut(old), cut(adv), cut(mask), "grpo", 0.2, 0.28, reduce=cut.reduce)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg="qwen2 loss")
    torch.testing.assert_close(dist.all_reduce_sum(grads(got / 2, qwen)), want_grads, rtol=1e-4, atol=1e-6)

    mine = torch.full((1 + dist.rank(), 2 + dist.rank()), float(dist.rank() + 1))  # uneven rows and widths
    rows, none = sequence.gather(mine, None)
    assert none is None and rows.tolist() == [[1.0, 1.0, 0.0], [2.0, 2.0, 2.0], [2.0, 2.0, 2.0]], rows
    print(f"rank {dist.rank()}: ok", flush=True)
    dist.destroy()


if __name__ == "__main__":
    main()
