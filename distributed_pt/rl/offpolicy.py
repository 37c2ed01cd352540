"""Off-policy correction for rollouts sampled by another engine (vLLM) than the one that trains.

The engine's kernels and precision give each sampled token a slightly different probability than the trainer's
forward pass does, so the "on-policy" update is a little off-policy. `mismatch_stats` measures by how much;
`truncated_is_weights` is the truncated importance-sampling correction (Yao et al., 2025, "Your efficient RL framework
secretly brings you off-policy RL training"): the policy-gradient term of each token is weighted by
min(pi_trainer / pi_engine, cap), per token or with the whole sequence's ratio.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from distributed_pt import dist
from distributed_pt.losses.masked import masked_mean


@torch.no_grad()
def mismatch_stats(trainer: torch.Tensor, engine: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Over the completion tokens (`mask`) of (B, T) log-probs: "kl" (k3 estimate of KL(engine || trainer), >= 0),
    "max_ratio" (the largest pi_trainer / pi_engine) and "abs_diff" (mean |log-prob difference|), as 0-dim tensors."""
    keep = mask.bool()
    log_ratio = torch.where(keep, trainer.double() - engine.double(), 0.0)  # float64: the differences are ~1e-6
    return {
        "kl": masked_mean((torch.expm1(log_ratio) - log_ratio).clamp(min=0), mask.double()),
        "max_ratio": torch.exp(log_ratio.masked_fill(~keep, -math.inf).max()),
        "abs_diff": masked_mean(log_ratio.abs(), mask.double()),
    }


@torch.no_grad()
def truncated_is_weights(
    trainer: torch.Tensor, engine: torch.Tensor, mask: torch.Tensor, level: Literal["token", "sequence"], cap: float
) -> torch.Tensor:
    """(B, T) weights min(pi_trainer / pi_engine, cap) of each completion token (`level` "token"), or of the whole
    completion's product of ratios ("sequence"), broadcast over its tokens; 0 off the mask."""
    if level not in ("token", "sequence"):
        raise ValueError(f"level must be 'token' or 'sequence', got {level!r}")
    log_ratio = torch.where(mask.bool(), trainer.float() - engine.float(), 0.0)
    if level == "sequence":
        log_ratio = log_ratio.sum(1, keepdim=True).expand_as(log_ratio)
    return torch.exp(log_ratio.clamp(max=math.log(cap))) * mask.float()


def mismatch_metrics(trainer: torch.Tensor, engine: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """`mismatch_stats` over every rank's tokens (collective): "offpolicy/kl" and "offpolicy/abs_diff" averaged over
    ranks, "offpolicy/max_ratio" the largest."""
    s = mismatch_stats(trainer, engine, mask)
    mean = dist.all_reduce_sum(torch.stack([s["kl"], s["abs_diff"]]).double().cpu()) / dist.world_size()
    top = dist.all_reduce_max(s["max_ratio"].float().cpu().reshape(1))
    return {"offpolicy/kl": mean[0].item(), "offpolicy/abs_diff": mean[1].item(), "offpolicy/max_ratio": top.item()}
