"""The engine-trainer mismatch and the truncated importance weights against float64 references, and the weights in
the GRPO and PPO losses (value and gradient)."""

from __future__ import annotations

import math

import pytest
import torch

from distributed_pt.losses.grpo import grpo_loss
from distributed_pt.losses.ppo import policy_loss
from distributed_pt.rl.offpolicy import mismatch_stats, truncated_is_weights

B, T = 5, 7  # odd shapes


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    trainer = -torch.rand(B, T, generator=g) * 3
    engine = trainer + 0.3 * torch.randn(B, T, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    mask[0] = 0  # an empty row
    mask[1, 2] = 1
    return trainer, engine, mask


def test_mismatch_stats_against_float64():
    trainer, engine, mask = inputs()
    d = (trainer.double() - engine.double())[mask.bool()]
    got = mismatch_stats(trainer, engine, mask)
    assert got["kl"].item() == pytest.approx((d.exp() - d - 1).mean().item(), rel=1e-5)
    assert got["max_ratio"].item() == pytest.approx(d.exp().max().item(), rel=1e-5)
    assert got["abs_diff"].item() == pytest.approx(d.abs().mean().item(), rel=1e-5)
    same = mismatch_stats(trainer, trainer, mask)
    assert same["kl"].item() == 0 and same["max_ratio"].item() == 1 and same["abs_diff"].item() == 0


@pytest.mark.parametrize("cap", [1.0, 1.5, 1e9])
def test_truncated_is_weights_against_float64(cap):
    trainer, engine, mask = inputs(1)
    d = (trainer.double() - engine.double()) * mask.double()
    token = torch.minimum(d.exp(), torch.tensor(cap, dtype=torch.float64)) * mask.double()
    seq = torch.minimum(d.sum(1, keepdim=True).exp(), torch.tensor(cap, dtype=torch.float64)) * mask.double()
    for level, want in [("token", token), ("sequence", seq)]:
        got = truncated_is_weights(trainer, engine, mask, level, cap).double()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    assert truncated_is_weights(trainer, engine, mask, "token", cap).max() <= cap
    with pytest.raises(ValueError, match="level"):
        truncated_is_weights(trainer, engine, mask, "batch", cap)


def test_a_huge_sequence_ratio_is_capped_not_infinite():
    trainer, mask = torch.zeros(1, 400), torch.ones(1, 400)
    w = truncated_is_weights(trainer, trainer - 1.0, mask, "sequence", 2.0)  # exp(400) overflows float32
    assert torch.isfinite(w).all() and w.max().item() == pytest.approx(2.0)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_grpo_loss_weights_the_policy_term_only(loss_type):
    """With weights w: the loss (and its gradient) is that of per-token policy terms times w, plus the unweighted KL."""
    trainer, engine, mask = inputs(2)
    logp = (trainer + 0.05 * torch.randn(B, T)).requires_grad_()
    ref = trainer - 0.2
    adv = torch.randn(B)
    w = truncated_is_weights(trainer, engine, mask, "token", 2.0)
    loss, _ = grpo_loss(logp, trainer, adv, mask, loss_type, 0.2, 0.28, ref, 0.1, T, is_weights=w)
    (grad,) = torch.autograd.grad(loss, logp)

    x = logp.detach().double().requires_grad_()
    ratio = torch.exp((x - trainer.double()) * mask.double())
    a = adv.double()[:, None]
    policy = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.28) * a) * w.double()
    kl = torch.exp(ref.double() - x) - (ref.double() - x) - 1
    per_token = (policy + 0.1 * kl) * mask.double()
    if loss_type == "grpo":
        want = (per_token.sum(1) / mask.double().sum(1).clamp(min=1)).mean()
    elif loss_type == "dr_grpo":
        want = per_token.sum() / (B * T)
    else:
        want = per_token.sum() / mask.double().sum()
    (want_grad,) = torch.autograd.grad(want, x)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-7)


def test_ppo_policy_loss_weights_each_token():
    trainer, engine, mask = inputs(3)
    logp = (trainer + 0.1 * torch.randn(B, T)).requires_grad_()
    adv = torch.randn(B, T)
    w = truncated_is_weights(trainer, engine, mask, "sequence", 1.7)
    loss, _ = policy_loss(logp, trainer, adv, mask, 0.2, is_weights=w)
    (grad,) = torch.autograd.grad(loss, logp)

    x = logp.detach().double().requires_grad_()
    ratio = torch.exp(x - trainer.double())
    a = adv.double()
    per_token = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2)) * w.double()
    want = (per_token * mask.double()).sum() / mask.double().sum()
    (want_grad,) = torch.autograd.grad(want, x)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-8)
    # weights of one: the plain loss
    plain, _ = policy_loss(logp, trainer, adv, mask, 0.2)
    assert policy_loss(logp, trainer, adv, mask, 0.2, torch.ones(B, T))[0].item() == pytest.approx(plain.item())
    assert not math.isclose(plain.item(), loss.item())
