"""Generalised advantage estimation and masked whitening (PPO)."""

from __future__ import annotations

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
