"""Pairwise reward loss and metrics on hand-computed scores."""

from __future__ import annotations

import math

import pytest
import torch

from distributed_pt.losses.pairwise import pairwise_loss, pairwise_metrics


def test_loss_on_hand_computed_scores():
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 1.0])
    # -log sigmoid(d) = log(1 + e^-d) for d = 1, 0, -2
    expected = (math.log(1 + math.exp(-1)) + math.log(2) + math.log(1 + math.exp(2))) / 3
    assert pairwise_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)


def test_margin_and_centering():
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 0.5])
    margin = torch.tensor([1.0, -1.0])  # d - m = 0, 1
    expected = (math.log(2) + math.log(1 + math.exp(-1))) / 2
    assert pairwise_loss(chosen, rejected, margin).item() == pytest.approx(expected, rel=1e-6)
    centering = 0.1 * (4 + 0.25 + 1 + 0.25) / 4
    assert pairwise_loss(chosen, rejected, margin, center_coef=0.1).item() == pytest.approx(expected + centering)


def test_gradient_pushes_chosen_up_and_rejected_down():
    chosen, rejected = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    pairwise_loss(chosen, rejected).backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    torch.testing.assert_close(chosen.grad, torch.full((2,), -0.25))  # -sigmoid(-0)/B


def test_metrics():
    m = pairwise_metrics(torch.tensor([3.0, 0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0, 2.0]))
    assert m["accuracy"] == (2 + 0.5) / 4  # two wins, a loss and a tie (half)
    assert m["margin"] == pytest.approx((2 - 1 + 1 + 0) / 4)
    rewards = torch.tensor([3.0, 0.0, 1.0, 2.0, 1.0, 1.0, 0.0, 2.0])
    assert m["reward_mean"] == pytest.approx(rewards.mean().item())
    assert m["reward_std"] == pytest.approx(rewards.std(unbiased=False).item())
