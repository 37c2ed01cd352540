"""PPO policy and value losses on small hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from distributed_pt.losses.ppo import explained_variance, policy_loss, value_loss


def test_policy_loss_clipping_hand_computed():
    old = torch.zeros(1, 4)
    # ratios e^0.5 = 1.65 (clipped for A>0), e^-0.5 = 0.61 (clipped for A<0), 1.1 (inside), masked token
    new = torch.tensor([[0.5, -0.5, math.log(1.1), 3.0]])
    adv = torch.tensor([[1.0, -1.0, 2.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = policy_loss(new, old, adv, mask, clip=0.2)
    expected = (-(1.2 * 1.0) + -(0.8 * -1.0) + -(1.1 * 2.0)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["policy_clipfrac"] == pytest.approx(2 / 3)
    assert stats["approx_kl"] == pytest.approx((0.125 + 0.125 + 0.5 * math.log(1.1) ** 2) / 3, rel=1e-5)


def test_policy_loss_is_pessimistic_when_the_ratio_moves_against_the_advantage():
    # A > 0 but ratio < 1 - eps: the unclipped (worse) term is kept, so the gradient still flows.
    new = torch.tensor([[math.log(0.5)]], requires_grad=True)
    loss, _ = policy_loss(new, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), clip=0.2)
    assert loss.item() == pytest.approx(-0.5)
    loss.backward()
    assert new.grad.item() == pytest.approx(-0.5)


def test_value_loss_clipping_hand_computed():
    old = torch.tensor([[1.0, 1.0]])
    values = torch.tensor([[2.0, 1.1]])
    returns = torch.tensor([[3.0, 0.0]])
    loss, stats = value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    # token 0: max((2-3)^2, (1.2-3)^2) = 3.24; token 1: max(1.1^2, 1.1^2) = 1.21
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.21) / 2, rel=1e-6)
    assert stats["value_clipfrac"] == pytest.approx(0.5)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.5), returns, mask) == pytest.approx(0.0, abs=1e-6)
