"""GRPO group advantages and the clipped GRPO/Dr. GRPO/DAPO loss on small hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from distributed_pt.losses.grpo import grpo_loss
from distributed_pt.losses.kl import kl_estimate


def _lp(ratios: list[list[float]]) -> torch.Tensor:
    """log-probs giving these ratios against old log-probs of 0."""
    return torch.tensor(ratios).log()


# Row 0: 3 tokens, ratios 1.1, 0.9, 1.0, A = 2 -> per-token -2.2, -1.8, -2.0 (sum -6.0).
# Row 1: 1 token, ratio 1.2, A = -1 -> per-token 1.2; its padding holds a huge ratio that must not matter.
# Bounds 0.3 / 0.3: nothing is clipped.
AGG_NEW = _lp([[1.1, 0.9, 1.0], [1.2, 1e30, 1e30]])
AGG_ADV = torch.tensor([2.0, -1.0])
AGG_MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("grpo", (-6.0 / 3 + 1.2 / 1) / 2),  # per-sequence mean, then mean over sequences
        ("dr_grpo", (-6.0 + 1.2) / (2 * 4)),  # B * max_completion_length = 2 * 4
        ("dapo", (-6.0 + 1.2) / 4),  # token mean over the 4 completion tokens
    ],
)
def test_each_loss_type_hand_computed(loss_type, expected):
    loss, stats = grpo_loss(AGG_NEW, torch.zeros(2, 3), AGG_ADV, AGG_MASK, loss_type, 0.3, 0.3, max_completion_length=4)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["clip_fraction"] == 0.0
    assert stats["ratio_mean"] == pytest.approx((1.1 + 0.9 + 1.0 + 1.2) / 4, rel=1e-6)
    assert "kl" not in stats


def test_loss_rejects_bad_input():
    new, old, adv, mask = torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(new, old, adv, mask, "dr_grpo", 0.2, 0.2)
    with pytest.raises(ValueError, match="longer than max_completion_length"):
        grpo_loss(new, old, adv, mask, "dr_grpo", 0.2, 0.2, max_completion_length=2)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(new, old, adv, mask, "ppo", 0.2, 0.2)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(new, old, adv, mask, "grpo", 0.2, 0.2, beta=0.1)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(new, old, adv.unsqueeze(1), mask, "grpo", 0.2, 0.2)


def test_clip_higher_hand_computed():
    # Four one-token completions, clip_low = 0.2 (floor 0.8), clip_high = 0.28 (ceiling 1.28):
    #   ratio 1.5,  A = +1: clipped high -> -1.28 (no gradient)
    #   ratio 0.5,  A = -1: clipped low  -> -min(-0.5, -0.8) = 0.8 (no gradient)
    #   ratio 1.25, A = +1: inside 1.28 (a symmetric 0.2 would clip it to 1.2) -> -1.25
    #   ratio 0.5,  A = +1: below the floor but A > 0, pessimistic unclipped term -> -0.5, not counted as clipped
    new = _lp([[1.5], [0.5], [1.25], [0.5]]).requires_grad_()
    adv, mask = torch.tensor([1.0, -1.0, 1.0, 1.0]), torch.ones(4, 1)
    loss, stats = grpo_loss(new, torch.zeros(4, 1), adv, mask, "dapo", clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx((-1.28 + 0.8 - 1.25 - 0.5) / 4, rel=1e-6)
    assert stats["clip_high_fraction"] == 0.25
    assert stats["clip_low_fraction"] == 0.25
    assert stats["clip_fraction"] == 0.5
    assert stats["ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.25 + 0.5) / 4, rel=1e-6)
    loss.backward()
    # d/dlogp of -r * A / 4 = -r * A / 4 where unclipped; 0 where clipped
    assert new.grad.squeeze(1).tolist() == pytest.approx([0.0, 0.0, -1.25 / 4, -0.5 / 4], abs=1e-7)

    symmetric, stats = grpo_loss(new, torch.zeros(4, 1), adv, mask, "dapo", clip_low=0.2, clip_high=0.2)
    assert symmetric.item() == pytest.approx((-1.2 + 0.8 - 1.2 - 0.5) / 4, rel=1e-6)
    assert stats["clip_high_fraction"] == 0.5


def test_k3_kl_term_hand_computed():
    # ratio 1 and A = 0: only the KL term is left. ref - logp = log 2, 0, log 0.5 ->
    # kl = 2 - log 2 - 1, 0, 0.5 + log 2 - 1
    logp = torch.zeros(1, 3)
    ref = torch.tensor([[math.log(2.0), 0.0, math.log(0.5)]])
    kls = [1 - math.log(2), 0.0, math.log(2) - 0.5]
    assert kl_estimate(logp, ref, "k3")[0].tolist() == pytest.approx(kls, rel=1e-6)  # the shared estimator
    mask, adv = torch.ones(1, 3), torch.zeros(1)
    loss, stats = grpo_loss(logp, logp, adv, mask, "grpo", 0.2, 0.2, ref_logprobs=ref, beta=0.1)
    assert loss.item() == pytest.approx(0.1 * sum(kls) / 3, rel=1e-6)
    assert stats["kl"] == pytest.approx(sum(kls) / 3, rel=1e-6)
    # beta = 0: the KL is reported but not added
    loss, stats = grpo_loss(logp, logp, adv, mask, "grpo", 0.2, 0.2, ref_logprobs=ref, beta=0.0)
    assert loss.item() == 0.0 and stats["kl"] == pytest.approx(sum(kls) / 3, rel=1e-6)


def test_k3_kl_is_zero_when_policy_equals_reference():
    new, adv, mask = _lp([[1.1, 0.9, 1.0], [1.2, 1.0, 1.0]]), torch.tensor([2.0, -1.0]), torch.ones(2, 3)
    plain, _ = grpo_loss(new, torch.zeros(2, 3), adv, mask, "grpo", 0.2, 0.2)
    with_ref, stats = grpo_loss(new, torch.zeros(2, 3), adv, mask, "grpo", 0.2, 0.2, ref_logprobs=new, beta=0.5)
    assert stats["kl"] == 0.0
    assert with_ref.item() == plain.item()


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("grpo", (-1.0 + 0.0 + 3 * 2.0 / 3) / 3),  # the empty row adds 0 but counts in B
        ("dr_grpo", (-1.0 + 3 * 2.0) / (3 * 3)),
        ("dapo", (-1.0 + 3 * 2.0) / 4),  # the empty row adds no tokens
    ],
)
def test_length_one_empty_and_no_eos_rows(loss_type, expected):
    # Row 0: length 1. Row 1: mask all zeros (and garbage log-probs). Row 2: full-length mask, i.e. the completion
    # ran into max_completion_length without EOS; the loss treats it like any other row. ratio 1, so -A per token.
    new = torch.tensor([[0.0, 7.0, 7.0], [40.0, float("nan"), -1e9], [0.0, 0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 0.0], [-60.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 0, 0], [0, 0, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, 5.0, -2.0])
    ref = torch.zeros(3, 3)
    loss, stats = grpo_loss(new, old, adv, mask, loss_type, 0.2, 0.2, ref, beta=0.1, max_completion_length=3)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert all(math.isfinite(v) for v in stats.values()) and stats["kl"] == 0.0
    loss.backward()
    assert torch.isfinite(new.grad).all() and new.grad[1].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_an_all_empty_batch_gives_zero(loss_type):
    z = torch.zeros(2, 3)
    loss, stats = grpo_loss(z, z, torch.ones(2), z, loss_type, 0.2, 0.2, ref_logprobs=z, max_completion_length=3)
    assert loss.item() == 0.0 and all(v == 0.0 for v in stats.values())


def test_gradient_follows_the_advantage():
    # On-policy (ratio 1), one token each: d loss / d logp_i = -A_i / B, so a descent step raises logp where A > 0,
    # lowers it where A < 0, and more for a larger A.
    new = torch.zeros(4, 1, requires_grad=True)
    adv = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    loss, _ = grpo_loss(new, new.detach(), adv, torch.ones(4, 1), "grpo", 0.2, 0.28)
    loss.backward()
    step = -new.grad.squeeze(1)
    assert step.tolist() == pytest.approx([-0.25, 0.0, 0.125, 0.5])
    assert torch.all(step[1:] > step[:-1])


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("grpo", -(1.0 + 3.0 + 2.0) / 3),  # -mean advantage over sequences
        ("dr_grpo", -(1.0 * 1 + 3.0 * 2 + 2.0 * 3) / (3 * 4)),  # -sum of A * length / (B * L)
        ("dapo", -(1.0 * 1 + 3.0 * 2 + 2.0 * 3) / 6),  # -token-weighted mean advantage
    ],
)
def test_on_policy_loss_is_minus_the_mean_advantage(loss_type, expected):
    new = torch.tensor([[-0.3, 0.0, 0.0], [-1.2, -0.7, 0.0], [-2.0, -0.1, -0.5]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]])
    loss, stats = grpo_loss(
        new, new, torch.tensor([1.0, 3.0, 2.0]), mask, loss_type, 0.2, 0.28, max_completion_length=4
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["ratio_mean"] == 1.0 and stats["clip_fraction"] == 0.0


def gspo_reference(logp, old, adv, mask, level, clip_low, clip_high):
    """GSPO (Zheng et al. 2025) in float64, written from the paper: s_i = exp(mean_t(logp - old)); "sequence":
    -min(s A, clip(s) A) at every token; "sequence_token": s_{i,t} = sg[s_i] * pi_t / sg[pi_t]. Token mean per
    completion, then the mean over completions (loss_type "grpo")."""
    x = logp.double()
    m = mask.double()
    seq = ((x - old.double()) * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)
    if level == "sequence":
        ratio = seq.exp().expand_as(x)
    else:
        ratio = seq.detach().exp() * torch.exp(x - x.detach())
    a = adv.double() if adv.dim() == 2 else adv.double()[:, None]
    per_token = -torch.minimum(ratio * a, ratio.clamp(1 - clip_low, 1 + clip_high) * a)
    return ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean(), seq.squeeze(1).exp()


@pytest.mark.parametrize("level", ["sequence", "sequence_token"])
@pytest.mark.parametrize("token_advantages", [False, True])
def test_gspo_loss_and_gradient_against_float64(level, token_advantages):
    g = torch.Generator().manual_seed(7)
    B, T = 5, 9
    old = -torch.rand(B, T, generator=g) * 2
    logp = (old + 0.3 * torch.randn(B, T, generator=g)).requires_grad_()
    mask = torch.zeros(B, T)
    for i, (start, n) in enumerate([(0, 9), (2, 4), (1, 1), (3, 6), (4, 0)]):  # an empty completion too
        mask[i, start : start + n] = 1
    adv = torch.randn(B, T, generator=g) if token_advantages else torch.randn(B, generator=g)
    loss, stats = grpo_loss(logp, old, adv, mask, "grpo", 0.1, 0.15, level=level)
    (grad,) = torch.autograd.grad(loss, logp)
    x = logp.detach().double().requires_grad_()
    want, seq_ratio = gspo_reference(x, old, adv, mask, level, 0.1, 0.15)
    (want_grad,) = torch.autograd.grad(want, x)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-7)
    outside = ((seq_ratio < 0.9) | (seq_ratio > 1.15))[:4].double().mean().item()  # the 4 non-empty completions
    assert stats["sequence_clip_fraction"] == pytest.approx(outside)
    assert (seq_ratio[:4] - 1).abs().max() > 0.15  # some sequences are clipped: the test exercises the clip


def test_gspo_token_has_the_sequence_value_and_a_per_token_gradient():
    """GSPO-token: the same loss value as GSPO with per-sequence advantages, a different gradient distribution."""
    g = torch.Generator().manual_seed(8)
    old = -torch.rand(3, 5, generator=g)
    logp = (old + 0.05 * torch.randn(3, 5, generator=g)).requires_grad_()
    mask, adv = torch.ones(3, 5), torch.randn(3, generator=g)
    seq, _ = grpo_loss(logp, old, adv, mask, "grpo", 0.2, 0.2, level="sequence")
    tok, _ = grpo_loss(logp, old, adv, mask, "grpo", 0.2, 0.2, level="sequence_token")
    assert seq.item() == pytest.approx(tok.item(), rel=1e-6)
    with pytest.raises(ValueError, match="level"):
        grpo_loss(logp, old, adv, mask, "grpo", 0.2, 0.2, level="batch")
