"""Masked reductions over per-token tensors (pure functions of tensors; no distributed calls)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def masked_mean(
    x: torch.Tensor,
    mask: torch.Tensor,
    dim: int | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean of x where mask is 1 (over everything, or along `dim`); 0 where the mask is empty. `reduce` (over
    everything only): sums partial sums over sequence-parallel shards (`engine.sequence.sum_over_shards`)."""
    mask = mask.to(x.dtype)
    if dim is None:
        whole = reduce or (lambda t: t)
        return whole((x * mask).sum()) / whole(mask.sum()).clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Variance of x where mask is 1 (biased)."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)
