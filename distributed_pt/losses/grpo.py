"""GRPO losses: group-relative advantages and the clipped, critic-free policy objective (pure functions of tensors).

Conventions follow TRL's `GRPOTrainer` (`_generate_and_score_completions`, `_compute_loss`); where ours differ is
said in each docstring.
"""

from __future__ import annotations

from typing import Literal

import torch

from distributed_pt.losses.kl import kl_estimate
from distributed_pt.losses.masked import masked_mean


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale: Literal["group", "batch", "none"],
    batch_std: float | None = None,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Reward minus its group's mean, optionally divided by a standard deviation.

    Stds are unbiased (Bessel's correction, `torch.std`, as TRL) and enter as `/ (std + eps)`. A group whose rewards
    are all equal gets advantage exactly 0 in every mode, even with `eps=0` (TRL gives ~0 up to rounding, or NaN at
    `eps=0`).

    Args:
        rewards: (N,) rewards laid out group by group: N = prompts * group_size, a prompt's completions contiguous.
        group_size: G, completions per prompt; at least 2 (a group of one has no baseline and no std).
        scale: "group" divides by the group's std (GRPO, DeepSeekMath); "batch" by the batch std (`batch_std` when
            given, else the std of `rewards`); "none" does not scale (Dr. GRPO).
        batch_std: the unbiased std of the rewards over the global batch, for "batch" when the caller has gathered it
            across ranks; ignored by the other modes.
        eps: added to the std before dividing.

    Returns:
        (N,) float32 advantages, one per completion.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group of one has no baseline), got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    grouped = rewards.float().view(-1, group_size)  # (prompts, G)
    adv = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        adv = adv / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        adv = adv / ((rewards.float().std() if batch_std is None else batch_std) + eps)
    flat = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)  # no signal: exact zeros, never 0/0
    return adv.masked_fill(flat, 0.0).reshape(-1)


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
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped policy objective with separate lower/upper bounds (DAPO clip-higher) and an optional k3 KL penalty.

    Per token: -min(r * A, clamp(r, 1 - clip_low, 1 + clip_high) * A) + beta * kl, with r = exp(logp - old) and
    kl = exp(ref - logp) - (ref - logp) - 1 (k3, >= 0; `losses.kl.kl_estimate(..., "k3")`). Aggregation:

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
        advantages: (B,) one advantage per completion, broadcast over its tokens.
        mask: (B, T) 1 on completion tokens, 0 elsewhere (prompt, padding).
        loss_type: "grpo", "dr_grpo" or "dapo" (see above).
        clip_low: lower clip epsilon: the ratio is clamped from below at 1 - clip_low.
        clip_high: upper clip epsilon: the ratio is clamped from above at 1 + clip_high.
        ref_logprobs: (B, T) reference log-probs; required when beta > 0.
        beta: KL coefficient.
        max_completion_length: the generation length limit; required by "dr_grpo".
        is_weights: (B, T) importance weights of the policy term (the off-policy correction of rollouts sampled by
            another engine, `rl.offpolicy.truncated_is_weights`); the KL term is not weighted.

    Returns:
        The scalar float32 loss (masked positions may hold anything) and python-float stats over completion
        tokens: "clip_low_fraction" (r < 1 - clip_low and A < 0), "clip_high_fraction" (r > 1 + clip_high and A > 0),
        "clip_fraction" (either), "ratio_mean", and "kl" when `ref_logprobs` is given.
    """
    if loss_type not in ("grpo", "dr_grpo", "dapo"):
        raise ValueError(f"loss_type must be 'grpo', 'dr_grpo' or 'dapo', got {loss_type!r}")
    if advantages.dim() != 1 or advantages.shape[0] != logprobs.shape[0]:
        raise ValueError(f"advantages must be (B,) = ({logprobs.shape[0]},), got {tuple(advantages.shape)}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs")
    keep = mask.bool()
    mask = mask.float()  # float32 math: bf16 cannot even count tokens past 256
    if loss_type == "dr_grpo":
        if max_completion_length is None or max_completion_length < 1:
            raise ValueError(f"loss_type 'dr_grpo' needs max_completion_length >= 1, got {max_completion_length}")
        if mask.sum(1).max() > max_completion_length:
            raise ValueError(f"a completion is longer than max_completion_length={max_completion_length}")

    logprobs = logprobs.float()
    adv = advantages.float().unsqueeze(1)  # (B, 1)
    ratio = torch.exp(torch.where(keep, logprobs - old_logprobs.float(), 0.0))  # padding never overflows to inf
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)  # (B, T)
    if is_weights is not None:
        per_token = per_token * is_weights.float()
    kl = None
    if ref_logprobs is not None:
        kl = kl_estimate(torch.where(keep, logprobs, 0.0), torch.where(keep, ref_logprobs.float(), 0.0), "k3")
        if beta > 0:
            per_token = per_token + beta * kl

    if loss_type == "grpo":
        loss = masked_mean(per_token, mask, dim=1).mean()
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (logprobs.shape[0] * max_completion_length)
    else:
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)

    with torch.no_grad():
        low = (ratio < 1.0 - clip_low) & (adv < 0)
        high = (ratio > 1.0 + clip_high) & (adv > 0)
        stats = {
            "clip_low_fraction": masked_mean(low.float(), mask).item(),
            "clip_high_fraction": masked_mean(high.float(), mask).item(),
            "clip_fraction": masked_mean((low | high).float(), mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
        }
        if kl is not None:
            stats["kl"] = masked_mean(kl, mask).item()
    return loss, stats
