"""Offline preference losses on sequence log-probs: DPO (+ cDPO label smoothing), IPO, SLiC hinge, SimPO.

DPO: Rafailov et al. 2023 (arXiv:2305.18290); cDPO: Mitchell 2023, "A note on DPO with noisy preferences"; IPO: Azar
et al. 2023 (arXiv:2310.12036); SLiC-HF: Zhao et al. 2023 (arXiv:2305.10425); SimPO: Meng et al. 2024 (arXiv:2405.14734)
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from distributed_pt.losses.pairwise import pair_accuracy

LossType = Literal["sigmoid", "ipo", "hinge", "simpo"]


def implicit_rewards(
    logps: torch.Tensor, beta: float, ref_logps: torch.Tensor | None = None, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """DPO's implicit reward beta * (log pi(y|x) - log pi_ref(y|x)), or SimPO's beta * log pi(y|x) / |y|.

    Args:
        logps: (B,) policy sequence log-probs (sum over response tokens).
        beta: the reward scale.
        ref_logps: (B,) reference sequence log-probs; None selects SimPO's reference-free reward.
        lengths: (B,) response token counts; required when `ref_logps` is None.

    Returns:
        (B,) float32 rewards (carrying the gradient of `logps`).
    """
    if ref_logps is not None:
        return beta * (logps.float() - ref_logps.float())
    if lengths is None:
        raise ValueError("a reference-free (SimPO) reward needs lengths")
    return beta * logps.float() / lengths.float()


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    loss_type: LossType,
    beta: float,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean pairwise preference loss over B (chosen, rejected) pairs.

    With h = (pi_c - ref_c) - (pi_r - ref_r), the log-ratio difference of summed log-probs, and
    s(z) = -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z) (eps = `label_smoothing`; cDPO):

    - "sigmoid" (DPO): s(beta * h). "hinge" (SLiC): relu(1 - beta * h). As TRL's `DPOTrainer`.
    - "ipo": (h - 1 / (2 * beta))^2, minimised at h = 1 / (2 beta) (past it the gradient lowers the margin). As the
      paper, h uses summed log-probs; TRL divides them by the length first.
    - "simpo": s(beta * (pi_c / |c| - pi_r / |r|) - gamma); reference-free (`ref_*` ignored), as TRL's `CPOTrainer`.

    `label_smoothing` applies to "sigmoid" and "simpo" only, `gamma` and the lengths to "simpo" only; a nonzero
    `label_smoothing` or `gamma` elsewhere is an error rather than silently ignored.

    Args:
        chosen_logps, rejected_logps: (B,) policy sequence log-probs (sum over response tokens; carry the gradient).
        ref_chosen_logps, ref_rejected_logps: (B,) reference sequence log-probs; None allowed only for "simpo".
        loss_type: "sigmoid", "ipo", "hinge" or "simpo" (see above).
        beta: > 0, the inverse temperature (DPO/hinge/SimPO) or the IPO regulariser.
        label_smoothing: eps in [0, 0.5), the assumed probability that a label is flipped.
        gamma: SimPO's target reward margin.
        chosen_lengths, rejected_lengths: (B,) response token counts (> 0); required by "simpo".

    Returns:
        The scalar float32 loss and python-float batch means: "rewards/chosen" and "rewards/rejected" (the implicit
        rewards: beta * (pi - ref), or beta * pi / |y| for "simpo"; gamma not included), "rewards/margin" (chosen -
        rejected), "rewards/accuracy" (fraction with chosen reward > rejected, a tie counting half: at the start, with
        policy = reference, every margin is 0 and accuracy 0.5), "logps/chosen"
        and "logps/rejected" (policy sequence log-probs).
    """
    if loss_type not in ("sigmoid", "ipo", "hinge", "simpo"):
        raise ValueError(f"loss_type must be 'sigmoid', 'ipo', 'hinge' or 'simpo', got {loss_type!r}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type not in ("sigmoid", "simpo"):
        raise ValueError(f"label_smoothing applies to 'sigmoid' and 'simpo', not {loss_type!r}")
    if gamma and loss_type != "simpo":
        raise ValueError(f"gamma applies to 'simpo' only, not {loss_type!r}")
    if chosen_logps.dim() != 1 or rejected_logps.shape != chosen_logps.shape:
        raise ValueError(f"log-probs must be (B,), got {tuple(chosen_logps.shape)} and {tuple(rejected_logps.shape)}")

    if loss_type == "simpo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type 'simpo' needs chosen_lengths and rejected_lengths")
        if (chosen_lengths <= 0).any() or (rejected_lengths <= 0).any():
            raise ValueError("chosen_lengths and rejected_lengths must be > 0")
        chosen = implicit_rewards(chosen_logps, beta, lengths=chosen_lengths)
        rejected = implicit_rewards(rejected_logps, beta, lengths=rejected_lengths)
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"loss_type {loss_type!r} needs ref_chosen_logps and ref_rejected_logps")
        chosen = implicit_rewards(chosen_logps, beta, ref_chosen_logps)
        rejected = implicit_rewards(rejected_logps, beta, ref_rejected_logps)
    margin = chosen - rejected  # (B,): beta * h, or SimPO's beta * (pi_c / |c| - pi_r / |r|)

    if loss_type in ("sigmoid", "simpo"):
        z = margin - gamma
        losses = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    elif loss_type == "ipo":
        losses = (margin / beta - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = F.relu(1.0 - margin)

    with torch.no_grad():
        stats = {
            "rewards/chosen": chosen.mean().item(),
            "rewards/rejected": rejected.mean().item(),
            "rewards/margin": margin.mean().item(),
            "rewards/accuracy": pair_accuracy(chosen, rejected),
            "logps/chosen": chosen_logps.float().mean().item(),
            "logps/rejected": rejected_logps.float().mean().item(),
        }
    return losses.mean(), stats
