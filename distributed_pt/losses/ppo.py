"""PPO losses: clipped policy objective, clipped value loss, entropy (pure functions of tensors)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from distributed_pt.losses.masked import masked_mean, masked_var


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    is_weights: torch.Tensor | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """-E[min(ratio * A, clip(ratio, 1-eps, 1+eps) * A)] over action tokens, each token's term times `is_weights`
    when given (the off-policy correction, `rl.offpolicy`); also clip fraction and approx KL. `reduce`: the tensors
    are a sequence-parallel shard's, the means the whole sequences' (`losses.masked.masked_mean`)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    per_token = torch.maximum(unclipped, clipped)
    loss = masked_mean(per_token if is_weights is None else per_token * is_weights, mask, reduce=reduce)
    with torch.no_grad():
        stats = {
            "policy_clipfrac": masked_mean((clipped > unclipped).float(), mask, reduce=reduce).item(),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask, reduce=reduce).item(),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """0.5 * E[max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)] over action tokens (`reduce`: as for
    `policy_loss`)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    losses = torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)
    loss = 0.5 * masked_mean(losses, mask, reduce=reduce)
    with torch.no_grad():
        clipped_more = ((clipped_values - returns) ** 2 > (values - returns) ** 2).float()
        stats = {"value_clipfrac": masked_mean(clipped_more, mask, reduce=reduce).item()}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[R - V] / Var[R] over action tokens (1 = perfect value function, <= 0 = no better than a constant)."""
    var_returns = masked_var(returns, mask)
    return (1 - masked_var(returns - values, mask) / var_returns.clamp(min=1e-8)).item()
