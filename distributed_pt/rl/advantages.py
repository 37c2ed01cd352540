"""Advantage estimators, in one place: PPO's GAE, and the critic-free family of the GRPO stage
(`grpo.advantage_estimator`).

- "grpo" (`group_advantages`; Shao et al. 2024, DeepSeekMath): A_i = (r_i - mean_group(r)) / (std + eps), the std of
  the group, of the batch, or none (Dr. GRPO, Liu et al. 2025). One value per completion.
- "rloo" (`rloo_advantages`; Ahmadian et al. 2024, "Back to Basics"): A_i = r_i - mean_{j != i} r_j, the mean of the
  other completions of the same prompt. One value per completion.
- "reinforce_pp" (`reinforce_pp_advantages`; Hu 2025, "REINFORCE++"): token rewards -beta * KL_t(policy || reference)
  with the score added at the last completion token; each token's return G_t = sum_{s >= t} r_s; the returns
  whitened over every rank's completion tokens. "reinforce_pp_baseline": the group's mean score subtracted first
  (OpenRLHF's `reinforce_baseline`). One value per token.
"""

from __future__ import annotations

from typing import Literal

import torch

from distributed_pt import dist


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the positions where mask is 1, across every rank's rollout (one all-reduce); masked
    positions come back as 0."""
    sums = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double().cpu()
    total, total_sq, n = dist.all_reduce_sum(sums).tolist()
    mean = total / max(n, 1)
    var = max(total_sq / max(n, 1) - mean**2, 0.0)
    return (x - mean) / (var + eps) ** 0.5 * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns over response tokens.

    Args:
        rewards, values: (B, T) per action token. mask: (B, T), 1 on response tokens (a contiguous run per row);
        the value after a row's last action is taken as 0 (the episode ends there).
    Returns:
        advantages (B, T) and returns = advantages + values (B, T), 0 where mask is 0.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.size(1))):
        next_value = values[:, t + 1] if t + 1 < values.size(1) else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


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


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) r_i minus the mean of the other G - 1 rewards of its group (= G / (G - 1) * (r_i - group mean)); groups
    laid out as for `group_advantages`. A group whose rewards all agree gets exactly 0."""
    if rewards.dim() != 1 or group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (N,) in whole groups of >= 2, got {tuple(rewards.shape)} / {group_size}")
    grouped = rewards.float().view(-1, group_size)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    flat = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    return (grouped - others).masked_fill(flat, 0.0).reshape(-1)


def reinforce_pp_advantages(
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    group_size: int | None = None,
) -> torch.Tensor:
    """REINFORCE++ advantages (B, T), whitened across ranks (collective: one all-reduce).

    Args:
        scores: (B,) each completion's reward.
        mask: (B, T) 1 on completion tokens (a contiguous run per row).
        kl: (B, T) per-token KL estimate of the policy to the reference (e.g. k1 = old log-prob - reference's);
            None: no KL term.
        kl_coef: its weight in the token rewards.
        group_size: the baseline variant: subtract the mean score of each group of this many completions first.
    """
    mask = mask.float()
    scores = scores.float()
    if group_size is not None:
        grouped = scores.view(-1, group_size)
        scores = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    rewards = torch.zeros_like(mask) if kl is None else -kl_coef * kl.float() * mask
    last = (mask * torch.arange(mask.size(1), device=mask.device)).argmax(1)  # each row's last completion token
    rewards[torch.arange(len(last)), last] += scores * (mask.sum(1) > 0)
    returns = (rewards * mask).flip(1).cumsum(1).flip(1)  # G_t = sum_{s >= t} r_s (gamma = 1)
    return masked_whiten(returns, mask)
