"""KL estimators and controllers."""

from __future__ import annotations

import math

import pytest
import torch

from distributed_pt.losses.kl import kl_estimate
from distributed_pt.rl.kl import AdaptiveKLController, FixedKLController


def test_k1_and_k3_hand_computed():
    logp, ref = torch.tensor([math.log(0.5), math.log(0.2)]), torch.tensor([math.log(0.25), math.log(0.4)])
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), torch.tensor([math.log(2), math.log(0.5)]))
    # k3 = r - 1 - log r, r = ref/pi
    expected = torch.tensor([0.5 - 1 - math.log(0.5), 2 - 1 - math.log(2)])
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), expected)
    assert (kl_estimate(logp, ref, "k3") >= 0).all()


def test_estimators_are_unbiased_for_the_true_kl():
    torch.manual_seed(0)
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    true_kl = (p * (p / q).log()).sum().item()
    samples = torch.multinomial(p, 200_000, replacement=True)
    for kind in ("k1", "k3"):
        est = kl_estimate(p.log()[samples], q.log()[samples], kind).mean().item()
        assert est == pytest.approx(true_kl, abs=5e-3), kind


def test_unknown_estimator():
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k2")


def test_adaptive_controller_moves_towards_target_and_round_trips():
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    ctl.update(kl=3.0, n_steps=10)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    ctl.update(kl=0.5, n_steps=10)  # error -0.5 clipped to -0.2
    assert ctl.value == pytest.approx(0.1 * 1.02 * 0.98)
    other = AdaptiveKLController(0.5, target=1.0, horizon=100)
    other.load_state_dict(ctl.state_dict())
    assert other.value == ctl.value
    fixed = FixedKLController(0.3)
    fixed.update(100.0, 10)
    assert fixed.value == 0.3
