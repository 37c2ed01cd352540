"""DPO, cDPO, IPO, SLiC hinge and SimPO losses and their implicit rewards on small hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from distributed_pt.losses.dpo import dpo_loss, implicit_rewards


def nls(z: float) -> float:
    """-log sigmoid(z) = log(1 + e^-z)."""
    return math.log(1 + math.exp(-z))


# Two pairs, summed log-probs:
#   pair 0: pi_c = -3 (ref -4 -> log-ratio +1),   pi_r = -5 (ref -4.5 -> -0.5): h = 1.5
#   pair 1: pi_c = -6 (ref -5.5 -> -0.5),         pi_r = -2 (ref -2.5 -> +0.5): h = -1
# beta = 0.5: beta * h = 0.75, -0.5. Rewards chosen 0.5, -0.25; rejected -0.25, 0.25.
PC, PR = torch.tensor([-3.0, -6.0]), torch.tensor([-5.0, -2.0])
RC, RR = torch.tensor([-4.0, -5.5]), torch.tensor([-4.5, -2.5])
# SimPO lengths: pi_c / |c| = -3/3, -6/2 = -1, -3; pi_r / |r| = -5/2, -2/1 = -2.5, -2: the differences are again
# 1.5 and -1, so beta * diff = 0.75, -0.5 as for DPO.
LC, LR = torch.tensor([3, 2]), torch.tensor([2, 1])


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("sigmoid", (nls(0.75) + nls(-0.5)) / 2),
        ("ipo", ((1.5 - 1.0) ** 2 + (-1.0 - 1.0) ** 2) / 2),  # target 1 / (2 beta) = 1: (0.25 + 4) / 2
        ("hinge", (0.25 + 1.5) / 2),  # relu(1 - 0.75), relu(1 + 0.5)
        ("simpo", (nls(0.75) + nls(-0.5)) / 2),  # gamma = 0 and the same per-token differences as DPO's h
    ],
)
def test_each_loss_type_hand_computed(loss_type, expected):
    loss, _ = dpo_loss(PC, PR, RC, RR, loss_type, beta=0.5, chosen_lengths=LC, rejected_lengths=LR)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_stats_are_the_implicit_rewards(loss_type):
    _, stats = dpo_loss(PC, PR, RC, RR, loss_type, beta=0.5)
    assert stats == pytest.approx(
        {
            "rewards/chosen": (0.5 - 0.25) / 2,
            "rewards/rejected": (-0.25 + 0.25) / 2,
            "rewards/margin": (0.75 - 0.5) / 2,
            "rewards/accuracy": 0.5,  # pair 0 only
            "logps/chosen": (-3 - 6) / 2,
            "logps/rejected": (-5 - 2) / 2,
        }
    )
    assert all(type(v) is float for v in stats.values())


def test_simpo_stats_are_length_normalised_rewards():
    # beta * pi / |y|: chosen 0.5 * (-1, -3) = -0.5, -1.5; rejected 0.5 * (-2.5, -2) = -1.25, -1; gamma is not in them
    _, stats = dpo_loss(PC, PR, None, None, "simpo", 0.5, gamma=0.3, chosen_lengths=LC, rejected_lengths=LR)
    assert stats == pytest.approx(
        {
            "rewards/chosen": -1.0,
            "rewards/rejected": -1.125,
            "rewards/margin": 0.125,
            "rewards/accuracy": 0.5,
            "logps/chosen": -4.5,
            "logps/rejected": -3.5,
        }
    )


def test_implicit_rewards():
    assert implicit_rewards(PC, 0.5, RC).tolist() == [0.5, -0.25]
    assert implicit_rewards(PR, 0.5, RR).tolist() == [-0.25, 0.25]
    assert implicit_rewards(PC, 0.5, lengths=LC).tolist() == [-0.5, -1.5]
    with pytest.raises(ValueError, match="lengths"):
        implicit_rewards(PC, 0.5)


def test_accuracy_counts_ties_as_half():
    # policy == reference: every reward is 0, loss log 2, every pair a tie: a coin flip's 0.5
    loss, stats = dpo_loss(RC, RR, RC, RR, "sigmoid", beta=0.5)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert stats["rewards/accuracy"] == 0.5 and stats["rewards/margin"] == 0.0


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
def test_label_smoothing_hand_computed(loss_type):
    # eps = 0.1: 0.9 * -log sigmoid(z) + 0.1 * -log sigmoid(-z) for z = 0.75, -0.5
    args = (PC, PR, RC, RR, loss_type, 0.5)
    lengths = {"chosen_lengths": LC, "rejected_lengths": LR}
    plain, _ = dpo_loss(*args, label_smoothing=0.0, **lengths)
    smoothed, stats = dpo_loss(*args, label_smoothing=0.1, **lengths)
    assert plain.item() == pytest.approx((nls(0.75) + nls(-0.5)) / 2, rel=1e-6)
    expected = (0.9 * nls(0.75) + 0.1 * nls(-0.75) + 0.9 * nls(-0.5) + 0.1 * nls(0.5)) / 2
    assert smoothed.item() == pytest.approx(expected, rel=1e-6)
    assert stats["rewards/margin"] == pytest.approx(0.125)  # the rewards do not depend on eps


def test_label_smoothing_stops_pushing_a_large_margin():
    # beta * h = 10: plain DPO would be ~0 and still push up; cDPO adds eps * -log sigmoid(-z) ~ eps * z
    pc = torch.tensor([100.0], requires_grad=True)
    loss, _ = dpo_loss(pc, torch.zeros(1), torch.zeros(1), torch.zeros(1), "sigmoid", 0.1, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * nls(10.0) + 0.1 * nls(-10.0), rel=1e-6)
    loss.backward()
    assert pc.grad.item() > 0  # past the point where 0.9 sigmoid(-z) = 0.1 sigmoid(z), the gradient reverses


def test_simpo_normalises_by_length():
    # pi_c = -6 over 6 tokens, pi_r = -4 over 2 tokens: per token -1 vs -2, the chosen wins despite the lower sum.
    # Same sums over 2 tokens each: -3 vs -2, the chosen loses. beta = 1.
    pc, pr = torch.tensor([-6.0]), torch.tensor([-4.0])
    long, stats = dpo_loss(
        pc, pr, None, None, "simpo", 1.0, chosen_lengths=torch.tensor([6]), rejected_lengths=torch.tensor([2])
    )
    assert long.item() == pytest.approx(nls(1.0), rel=1e-6) and stats["rewards/accuracy"] == 1.0
    short, stats = dpo_loss(
        pc, pr, None, None, "simpo", 1.0, chosen_lengths=torch.tensor([2]), rejected_lengths=torch.tensor([2])
    )
    assert short.item() == pytest.approx(nls(-1.0), rel=1e-6) and stats["rewards/accuracy"] == 0.0


def test_simpo_gamma_shifts_the_margin():
    # beta * diff = 0.75, -0.5; gamma = 0.3 -> z = 0.45, -0.8
    lengths = {"chosen_lengths": LC, "rejected_lengths": LR}
    loss, _ = dpo_loss(PC, PR, None, None, "simpo", 0.5, gamma=0.3, **lengths)
    assert loss.item() == pytest.approx((nls(0.45) + nls(-0.8)) / 2, rel=1e-6)
    smoothed, _ = dpo_loss(PC, PR, None, None, "simpo", 0.5, label_smoothing=0.1, gamma=0.3, **lengths)
    expected = (0.9 * nls(0.45) + 0.1 * nls(-0.45) + 0.9 * nls(-0.8) + 0.1 * nls(0.8)) / 2
    assert smoothed.item() == pytest.approx(expected, rel=1e-6)


def test_simpo_ignores_the_reference():
    lengths = {"chosen_lengths": LC, "rejected_lengths": LR}
    without, _ = dpo_loss(PC, PR, None, None, "simpo", 0.5, **lengths)
    with_ref, _ = dpo_loss(PC, PR, RC, RR, "simpo", 0.5, **lengths)
    assert with_ref.item() == without.item()


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("sigmoid", (nls(1.5) + nls(-1.0)) / 2),  # beta * h = 1.5, -1
        ("ipo", ((1.5 - 0.5) ** 2 + (-1.0 - 0.5) ** 2) / 2),  # target 1 / (2 beta) = 0.5: (1 + 2.25) / 2
        ("hinge", (0.0 + 2.0) / 2),  # relu(1 - 1.5) = 0: pair 0 is past the margin
        ("simpo", (nls(1.5) + nls(-1.0)) / 2),
    ],
)
def test_beta_scaling_at_beta_one(loss_type, expected):
    loss, stats = dpo_loss(PC, PR, RC, RR, loss_type, beta=1.0, chosen_lengths=LC, rejected_lengths=LR)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["rewards/margin"] == pytest.approx(0.25)  # twice beta = 0.5's: rewards are linear in beta


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "simpo"])
def test_gradient_raises_chosen_and_lowers_rejected(loss_type):
    # Policy == reference (h = 0), B = 2, beta = 0.5, lengths 2 (SimPO: z = 0.5 * (-2 / 2 - (-2 / 2)) = 0):
    #   sigmoid: d/dpi_c = -beta * sigmoid(0) / B = -0.125;  ipo: 2 * (0 - 1) / B = -1;  hinge: -beta / B = -0.25;
    #   simpo: -beta / |c| * sigmoid(0) / B = -0.0625. Rejected: the same with the opposite sign.
    expected = {"sigmoid": -0.125, "ipo": -1.0, "hinge": -0.25, "simpo": -0.0625}[loss_type]
    pc, pr = torch.full((2,), -2.0, requires_grad=True), torch.full((2,), -2.0, requires_grad=True)
    ref, lengths = torch.full((2,), -2.0), torch.full((2,), 2)
    loss, _ = dpo_loss(pc, pr, ref, ref, loss_type, 0.5, chosen_lengths=lengths, rejected_lengths=lengths)
    loss.backward()
    assert pc.grad.tolist() == pytest.approx([expected] * 2, rel=1e-6)
    assert pr.grad.tolist() == pytest.approx([-expected] * 2, rel=1e-6)
    # and a step up on the chosen log-prob lowers the loss
    higher, _ = dpo_loss(pc + 0.1, pr, ref, ref, loss_type, 0.5, chosen_lengths=lengths, rejected_lengths=lengths)
    assert higher.item() < loss.item()


def test_ipo_gradient_reverses_past_its_target():
    # beta = 0.5, target h = 1: pair 0 (h = 1.5) is past it, so IPO lowers its chosen: 2 * (1.5 - 1) / B = +0.5;
    # pair 1 (h = -1): 2 * (-1 - 1) / B = -2.
    pc = PC.clone().requires_grad_()
    loss, _ = dpo_loss(pc, PR, RC, RR, "ipo", beta=0.5)
    loss.backward()
    assert pc.grad.tolist() == pytest.approx([0.5, -2.0], rel=1e-6)


def test_bf16_inputs_give_a_float32_loss():
    loss, _ = dpo_loss(PC.bfloat16(), PR.bfloat16(), RC.bfloat16(), RR.bfloat16(), "sigmoid", beta=0.5)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx((nls(0.75) + nls(-0.5)) / 2, rel=1e-6)  # these values are exact in bf16


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(PC, PR, RC, RR, "kto", 0.5)
    with pytest.raises(ValueError, match="needs chosen_lengths"):
        dpo_loss(PC, PR, None, None, "simpo", 0.5)
    with pytest.raises(ValueError, match="needs chosen_lengths"):
        dpo_loss(PC, PR, None, None, "simpo", 0.5, chosen_lengths=LC)
    with pytest.raises(ValueError, match="> 0"):
        dpo_loss(PC, PR, None, None, "simpo", 0.5, chosen_lengths=LC, rejected_lengths=torch.tensor([1, 0]))
    for loss_type in ("sigmoid", "ipo", "hinge"):
        with pytest.raises(ValueError, match="needs ref_chosen_logps"):
            dpo_loss(PC, PR, None, RR, loss_type, 0.5)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(PC, PR, RC, RR, "ipo", 0.0)
    with pytest.raises(ValueError, match="label_smoothing must be"):
        dpo_loss(PC, PR, RC, RR, "sigmoid", 0.5, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing applies"):
        dpo_loss(PC, PR, RC, RR, "ipo", 0.5, label_smoothing=0.1)
    with pytest.raises(ValueError, match="gamma"):
        dpo_loss(PC, PR, RC, RR, "sigmoid", 0.5, gamma=0.5)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        dpo_loss(PC.unsqueeze(1), PR.unsqueeze(1), RC, RR, "sigmoid", 0.5)
