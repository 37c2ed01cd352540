"""The clipped, critic-free policy objective of GRPO and its relatives (a pure function of tensors; the advantage
estimators are in `rl.advantages`).

Conventions follow TRL's `GRPOTrainer` (`_generate_and_score_completions`, `_compute_loss`); where ours differ is
said in each docstring.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from distributed_pt.losses.kl import kl_estimate
from distributed_pt.losses.masked import masked_mean


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    loss_type: Literal["grpo", "dr_grpo", "dapo"],
    clip_low: float,
    clip_high: float,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    max_completion_length: int | None = None,
    is_weights: torch.Tensor | None = None,
    level: Literal["token", "sequence", "sequence_token"] = "token",
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped policy objective with separate lower/upper bounds (DAPO clip-higher) and an optional k3 KL penalty.

    Per token: -min(r * A, clamp(r, 1 - clip_low, 1 + clip_high) * A) + beta * kl, with kl = exp(ref - logp) -
    (ref - logp) - 1 (k3, >= 0; `losses.kl.kl_estimate(..., "k3")`) and the importance ratio r by `level`:

    - "token" (GRPO, PPO): r_t = exp(logp_t - old_t).
    - "sequence" (GSPO, Zheng et al. 2025): the completion's length-normalised ratio s = exp(mean_t(logp_t - old_t)),
      the same for all its tokens, so the clip acts on whole sequences.
    - "sequence_token" (GSPO-token): r_t = sg[s] * exp(logp_t - sg[logp_t]): the value of s, the gradient of each
      token's own log-prob scaled by s (token-level advantages then weigh tokens differently).

    Aggregation:

    - "grpo": each sequence's token mean, then the mean over all B rows (an empty row adds 0 but counts in B, as TRL).
    - "dr_grpo": sum over tokens / (B * max_completion_length), a constant normaliser (Dr. GRPO).
    - "dapo": sum over tokens / completion tokens in these tensors (token mean; TRL's "bnpo").

    Differences from TRL's `_compute_loss`: TRL's "dapo" divides by the token count of the whole global batch
    (all ranks and accumulation steps); ours divides by the tokens passed in, so a caller splitting a rollout into
    micro-batches that wants the global token mean rescales by local / global tokens. The "kl" stat is reported
    whenever `ref_logprobs` is given (the penalty is added only when beta > 0). Stats over an empty mask are 0, not
    NaN. TRL's optional two-sided `delta` clip is not implemented.

    Args:
        logprobs: (B, T) per-token log-probs under the current policy (carries the gradient).
        old_logprobs: (B, T) log-probs under the policy that sampled the completions.
        advantages: (B,) one advantage per completion, broadcast over its tokens, or (B, T) one per token.
        mask: (B, T) 1 on completion tokens, 0 elsewhere (prompt, padding).
        loss_type: "grpo", "dr_grpo" or "dapo" (see above).
        clip_low: lower clip epsilon: the ratio is clamped from below at 1 - clip_low.
        clip_high: upper clip epsilon: the ratio is clamped from above at 1 + clip_high.
        ref_logprobs: (B, T) reference log-probs; required when beta > 0.
        beta: KL coefficient.
        max_completion_length: the generation length limit; required by "dr_grpo".
        is_weights: (B, T) importance weights of the policy term (the off-policy correction of rollouts sampled by
            another engine, `rl.offpolicy.truncated_is_weights`); the KL term is not weighted.
        reduce: with sequence parallelism, the tensors hold this rank's shard of each sequence and `reduce` sums a
            partial sum over the shards (`engine.sequence.sum_over_shards`): loss and stats are then the whole
            sequences' on every rank of the group.

    Returns:
        The scalar float32 loss (masked positions may hold anything) and python-float stats over completion
        tokens: "clip_low_fraction" (r < 1 - clip_low and A < 0), "clip_high_fraction" (r > 1 + clip_high and A > 0),
        "clip_fraction" (either), "ratio_mean", "kl" when `ref_logprobs` is given, and for the sequence levels
        "sequence_clip_fraction" (completions whose sequence ratio is outside the clip range).
    """
    if loss_type not in ("grpo", "dr_grpo", "dapo"):
        raise ValueError(f"loss_type must be 'grpo', 'dr_grpo' or 'dapo', got {loss_type!r}")
    if advantages.shape not in (logprobs.shape[:1], logprobs.shape):
        raise ValueError(f"advantages must be (B,) or (B, T) = {tuple(logprobs.shape)}, got {tuple(advantages.shape)}")
    if level not in ("token", "sequence", "sequence_token"):
        raise ValueError(f"level must be 'token', 'sequence' or 'sequence_token', got {level!r}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs")
    whole = reduce or (lambda x: x)  # partial sums over tokens → sums over whole sequences
    keep = mask.bool()
    mask = mask.float()  # float32 math: bf16 cannot even count tokens past 256
    lengths = whole(mask.sum(1))  # (B,)
    if loss_type == "dr_grpo":
        if max_completion_length is None or max_completion_length < 1:
            raise ValueError(f"loss_type 'dr_grpo' needs max_completion_length >= 1, got {max_completion_length}")
        if lengths.max() > max_completion_length:
            raise ValueError(f"a completion is longer than max_completion_length={max_completion_length}")

    logprobs = logprobs.float()
    adv = advantages.float() if advantages.dim() == 2 else advantages.float().unsqueeze(1)  # (B, T) or (B, 1)
    log_ratio = torch.where(keep, logprobs - old_logprobs.float(), 0.0)  # padding never overflows to inf
    sequence = (whole(log_ratio.sum(1)) / lengths.clamp(min=1)).unsqueeze(1)  # (B, 1) GSPO's log s
    if level == "sequence":
        log_ratio = sequence.expand_as(log_ratio)
    elif level == "sequence_token":
        log_ratio = sequence.detach() + log_ratio - log_ratio.detach()
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)  # (B, T)
    if is_weights is not None:
        per_token = per_token * is_weights.float()
    kl = None
    if ref_logprobs is not None:
        kl = kl_estimate(torch.where(keep, logprobs, 0.0), torch.where(keep, ref_logprobs.float(), 0.0), "k3")
        if beta > 0:
            per_token = per_token + beta * kl

    if loss_type == "grpo":  # each sequence's token mean, then the mean over rows
        loss = (whole((per_token * mask).sum(1)) / lengths.clamp(min=1)).mean()
    elif loss_type == "dr_grpo":
        loss = whole((per_token * mask).sum()) / (logprobs.shape[0] * max_completion_length)
    else:
        loss = whole((per_token * mask).sum()) / lengths.sum().clamp(min=1)

    with torch.no_grad():
        low = (ratio < 1.0 - clip_low) & (adv < 0)
        high = (ratio > 1.0 + clip_high) & (adv > 0)
        names = ["clip_low_fraction", "clip_high_fraction", "clip_fraction", "ratio_mean"] + ["kl"] * (kl is not None)
        values = [low.float(), high.float(), (low | high).float(), ratio] + [kl] * (kl is not None)
        sums = whole(torch.stack([(v * mask).sum() for v in values]))  # one all-reduce with sequence parallelism
        stats = dict(zip(names, (sums / lengths.sum().clamp(min=1)).tolist(), strict=True))
        if level != "token":
            s = sequence.squeeze(1).exp()
            outside = ((s < 1.0 - clip_low) | (s > 1.0 + clip_high)).float()
            stats["sequence_clip_fraction"] = masked_mean(outside, (lengths > 0).float()).item()
    return loss, stats
