"""GAE and masked whitening against small hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from distributed_pt.losses.masked import masked_mean
from distributed_pt.rl.advantages import gae, masked_whiten


def test_gae_hand_computed():
    # One row, three action tokens then padding. gamma = 0.9, lambda = 0.5.
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 9.0]])  # the padded value must not leak in
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    d2 = 1.0 + 0.9 * 0.0 - 0.4  # terminal: next value 0
    d1 = 0.0 + 0.9 * 0.4 - 0.2
    d0 = 0.0 + 0.9 * 0.2 - 0.5
    a2 = d2
    a1 = d1 + 0.9 * 0.5 * a2
    a0 = d0 + 0.9 * 0.5 * a1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, a1 + 0.2, a2 + 0.4, 0.0]]))


def test_gae_with_lambda_one_gives_discounted_returns():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.3, -0.2, 0.7]])
    _, ret = gae(rewards, values, torch.ones(1, 3), gamma=0.5, lam=1.0)
    torch.testing.assert_close(ret, torch.tensor([[1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0]]))


def test_gae_rows_with_action_span_in_the_middle():
    # Right-padded prompt+response layout: actions at positions 1..2 of row 0 and 2..3 of row 1.
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    rewards = torch.tensor([[0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    values = torch.zeros(2, 4)
    adv, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 2.0, 2.0, 0.0], [0.0, 0.0, 1.0, 1.0]]))


def test_masked_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = masked_whiten(x, mask)
    std = torch.tensor([1.0, 2.0, 3.0]).std(unbiased=False)
    torch.testing.assert_close(out, torch.tensor([[-1 / std, 0.0, 1 / std, 0.0]]), rtol=1e-5, atol=1e-6)
    assert masked_mean(out, mask).item() == pytest.approx(0.0, abs=1e-6)
