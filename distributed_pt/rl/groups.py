"""The critic-free RL stage's rollout batches (GRPO and its family, `stages/grpo.py`): scored groups of completions,
DAPO's dynamic sampling, and the choice of advantage estimator (the estimators themselves: `rl.advantages`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from distributed_pt import dist
from distributed_pt.config import GRPOSection
from distributed_pt.rl.advantages import group_advantages, reinforce_pp_advantages, rloo_advantages
from distributed_pt.rl.rollout import Samples, cat, overlong_penalty, take


@dataclasses.dataclass
class Rollout:
    """Completions of a batch of prompts (each `num_generations` times, contiguous) and their rewards."""

    samples: Samples
    total: torch.Tensor  # (B,) reward
    per_source: dict[str, torch.Tensor]  # each reward source's (B,) values
    texts: list[str]  # each completion's prompt

    def log_samples(self, logger: Any, step: int, n: int = 4) -> None:
        """A W&B table of the first `n` completions (prompt, completion, reward); the first printed on rank 0."""
        rows = range(min(n, len(self.texts)))
        table = [[self.texts[i], self.samples.completions[i], self.total[i].item()] for i in rows]
        logger.log_table("samples", ["prompt", "completion", "reward"], table, step=step)
        dist.print0(f"sample @ {step}: {table[0][0]!r} -> {table[0][1]!r} (reward {table[0][2]:.2f})")

    def take(self, rows: list[int]) -> Rollout:
        per = {k: v[rows] for k, v in self.per_source.items()}
        return Rollout(take(self.samples, rows), self.total[rows], per, [self.texts[i] for i in rows])


def overlong_shaped(batch: Rollout, grpo: GRPOSection) -> Rollout:
    """DAPO's overlong shaping added to the rewards ("overlong" among the sources) when `grpo.overlong_buffer` > 0."""
    if not grpo.overlong_buffer:
        return batch
    lengths = batch.samples.action_mask.sum(1)
    penalty = overlong_penalty(lengths, grpo.max_new_tokens, grpo.overlong_buffer, grpo.overlong_penalty)
    return Rollout(batch.samples, batch.total + penalty, batch.per_source | {"overlong": penalty}, batch.texts)


def dynamic_sample(roll_out: Callable[[], Rollout], grpo: GRPOSection, pad_id: int) -> tuple[Rollout, dict]:
    """DAPO's dynamic sampling: keep the groups whose rewards differ, rolling out more prompt batches (at most
    `grpo.max_extra_rollouts`) until every rank has `grpo.rollout_batch_size` of them; every rank then keeps as many
    as the rank with the fewest (collective: the decisions are taken on all-reduced counts). With none anywhere, the
    first rollout is kept whole. Returns the batch and {"dropped_group_fraction", "extra_rollouts"}."""
    G, want = grpo.num_generations, grpo.rollout_batch_size
    first = batch = roll_out()
    kept: list[Rollout] = []
    n_kept = sampled = extra = 0
    while True:
        grouped = batch.total.view(-1, G)
        informative = (grouped != grouped[:, :1]).any(1)  # rewards that differ: a signal
        rows = [g * G + k for g in informative.nonzero().flatten().tolist() for k in range(G)]
        kept.append(batch.take(rows))
        n_kept, sampled = n_kept + len(rows) // G, sampled + len(informative)
        fewest = -dist.all_reduce_max(torch.tensor([-float(n_kept)])).item()  # the minimum over ranks
        if fewest >= want or extra >= grpo.max_extra_rollouts:
            break
        batch, extra = roll_out(), extra + 1
    n = int(min(fewest, want))
    if n == 0:
        out = first
    else:
        joined = Rollout(cat([k.samples for k in kept], pad_id), torch.cat([k.total for k in kept]),
                         {key: torch.cat([k.per_source[key] for k in kept]) for key in first.per_source},
                         [t for k in kept for t in k.texts])  # fmt: skip
        out = joined.take(list(range(n * G)))
    return out, {"dropped_group_fraction": 1.0 - n_kept / sampled, "extra_rollouts": float(extra),
                 "groups": float(n or len(first.total) // G)}  # fmt: skip


def estimate_advantages(
    total: torch.Tensor, mask: torch.Tensor, old: torch.Tensor | None, ref: torch.Tensor | None, grpo: GRPOSection
) -> torch.Tensor:
    """`grpo.advantage_estimator`'s advantages: (B,) for grpo and rloo, (B, T) for the REINFORCE++ pair (collective
    where they normalise over the batch)."""
    G, estimator = grpo.num_generations, grpo.advantage_estimator
    if estimator == "grpo":
        batch_std = global_std(total) if grpo.scale_rewards == "batch" else None
        return group_advantages(total, G, grpo.scale_rewards, batch_std=batch_std)
    if estimator == "rloo":
        return rloo_advantages(total, G)
    kl = None if ref is None else old - ref  # k1 per token, in the rewards
    return reinforce_pp_advantages(total, mask, kl, grpo.beta, G if estimator == "reinforce_pp_baseline" else None)


def global_std(x: torch.Tensor) -> float:
    """Unbiased std of `x` over every rank's values (one all-reduce), as `group_advantages` computes its own."""
    sums = torch.stack([x.sum(), (x * x).sum(), torch.tensor(float(x.numel()), device=x.device)]).double().cpu()
    total, sq, n = dist.all_reduce_sum(sums).tolist()
    return max((sq - total * total / n) / max(n - 1, 1), 0.0) ** 0.5
