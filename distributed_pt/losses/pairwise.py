"""Pairwise preference loss for reward models (InstructGPT): -log sigmoid(r_chosen - r_rejected - margin)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None, center_coef: float = 0.0
) -> torch.Tensor:
    """Mean over pairs of -log sigmoid(r_c - r_r - margin), plus center_coef * mean(r^2) over all 2B rewards.

    Args:
        chosen, rejected: (B,) rewards. margin: (B,) or None.
    """
    diff = chosen.float() - rejected.float()
    if margin is not None:
        diff = diff - margin.float()
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * torch.cat([chosen, rejected]).float().pow(2).mean()
    return loss


@torch.no_grad()
def pairwise_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Accuracy (r_c > r_r; a tie counts half, as a coin flip would), mean margin r_c - r_r, and mean/std of all
    rewards of the batch."""
    rewards = torch.cat([chosen, rejected]).float()
    return {
        "accuracy": pair_accuracy(chosen, rejected),
        "margin": (chosen - rejected).float().mean().item(),
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std(unbiased=False).item(),
    }


def pair_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """The fraction of pairs whose chosen reward is higher, a tie counting half."""
    return ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean().item()
