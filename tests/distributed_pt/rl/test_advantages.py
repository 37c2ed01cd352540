"""The advantage estimators: GAE and whitening (PPO), grpo, rloo and REINFORCE++ (GRPO stage), against hand-computed
cases and independent per-row loops."""

from __future__ import annotations

import math

import pytest
import torch

from distributed_pt.losses.masked import masked_mean
from distributed_pt.rl.advantages import (
    gae,
    group_advantages,
    masked_whiten,
    reinforce_pp_advantages,
    rloo_advantages,
)


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


EPS = 1e-4
# Two prompts, G = 3: group 1 = [0, 0, 3] (mean 1, deviations -1, -1, 2, unbiased var (1 + 1 + 4) / 2 = 3),
# group 2 = [5, 5, 5] (no signal). Whole batch: mean 3, deviations -3, -3, 0, 2, 2, 2, unbiased var 30 / 5 = 6.
REWARDS = torch.tensor([0.0, 0.0, 3.0, 5.0, 5.0, 5.0])
DEVIATIONS = [-1.0, -1.0, 2.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "scale, batch_std, divisor",
    [
        ("group", None, math.sqrt(3) + EPS),  # group 2's std is 0, but its deviations are exactly 0
        ("batch", None, math.sqrt(6) + EPS),
        ("batch", 2.0, 2.0 + EPS),  # the caller's all-reduced std wins over the local one
        ("none", None, 1.0),
    ],
)
def test_group_advantages_hand_computed(scale, batch_std, divisor):
    adv = group_advantages(REWARDS, group_size=3, scale=scale, batch_std=batch_std)
    assert adv.shape == (6,)
    assert adv.tolist() == pytest.approx([d / divisor for d in DEVIATIONS], rel=1e-6)


def test_group_std_is_unbiased():
    # [0, 1]: biased std 0.5 would give ±1; unbiased std sqrt(0.5) gives ±0.5 / sqrt(0.5) = ±sqrt(0.5)
    adv = group_advantages(torch.tensor([0.0, 1.0]), group_size=2, scale="group", eps=0.0)
    assert adv.tolist() == pytest.approx([-math.sqrt(0.5), math.sqrt(0.5)], rel=1e-6)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("eps", [1e-4, 0.0])
def test_a_group_with_equal_rewards_gets_exactly_zero(scale, eps):
    # 0.1 and 0.7 are not exact in binary, so mean subtraction alone would leave rounding noise; eps=0 would be 0/0
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7])
    adv = group_advantages(rewards, group_size=3, scale=scale, eps=eps)
    assert adv.tolist() == [0.0] * 6
    mixed = group_advantages(torch.tensor([0.1, 0.1, 1.0, 0.0]), group_size=2, scale=scale, eps=eps)
    assert mixed[:2].tolist() == [0.0, 0.0] and torch.isfinite(mixed).all()


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.ones(4), group_size=1, scale="group")
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.ones(4), group_size=3, scale="group")
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.ones(4), group_size=2, scale="prompt")
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.ones(2, 2), group_size=2, scale="group")


def test_rloo_hand_computed():
    # group 1 [0, 0, 3]: the others' means 1.5, 1.5, 0 -> -1.5, -1.5, 3; group 2 [5, 5, 5]: no signal
    assert rloo_advantages(REWARDS, 3).tolist() == pytest.approx([-1.5, -1.5, 3.0, 0.0, 0.0, 0.0])


def test_rloo_equals_a_per_row_loop_on_random_rewards():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(5 * 4, generator=g)
    rewards[8:12] = 0.7  # a zero-std group
    got = rloo_advantages(rewards, 4)
    for i in range(len(rewards)):
        group = range(i // 4 * 4, i // 4 * 4 + 4)
        others = [rewards[j].item() for j in group if j != i]
        assert got[i].item() == pytest.approx(rewards[i].item() - sum(others) / 3, abs=1e-6)
    assert got[8:12].tolist() == [0.0] * 4


def reinforce_pp_loop(scores, mask, kl, kl_coef, group_size):
    """REINFORCE++ written out row by row and token by token, in float64."""
    B, T = mask.shape
    scores = [float(x) for x in scores]
    if group_size:
        scores = [s - sum(scores[i // group_size * group_size : (i // group_size + 1) * group_size]) / group_size
                  for i, s in enumerate(scores)]  # fmt: skip
    returns = [[0.0] * T for _ in range(B)]
    values = []
    for i in range(B):
        tokens = [t for t in range(T) if mask[i, t]]
        for t in tokens:
            r = [(-kl_coef * float(kl[i, u]) if kl is not None else 0.0) + (scores[i] if u == tokens[-1] else 0.0)
                 for u in tokens if u >= t]  # fmt: skip
            returns[i][t] = sum(r)
            values.append(returns[i][t])
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return [[(returns[i][t] - mean) / std if mask[i, t] else 0.0 for t in range(T)] for i in range(B)]


@pytest.mark.parametrize("baseline", [False, True], ids=["reinforce_pp", "reinforce_pp_baseline"])
@pytest.mark.parametrize("with_kl", [False, True])
def test_reinforce_pp_equals_a_per_token_loop(baseline, with_kl):
    g = torch.Generator().manual_seed(1)
    B, T, G = 6, 7, 3
    mask = torch.zeros(B, T)
    for i, (start, n) in enumerate([(1, 4), (2, 5), (0, 1), (3, 0), (1, 6), (2, 3)]):  # one empty row
        mask[i, start : start + n] = 1
    scores = torch.randn(B, generator=g)
    kl = torch.rand(B, T, generator=g) if with_kl else None
    got = reinforce_pp_advantages(scores, mask, kl, 0.3, G if baseline else None)
    want = reinforce_pp_loop(scores, mask, kl, 0.3, G if baseline else None)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=1e-5)


def test_reinforce_pp_hand_computed():
    # Two rows of 2 tokens, no KL: returns are the score at every token -> [1, 1] and [-1, -1], whitened: +-1.
    mask = torch.ones(2, 2)
    adv = reinforce_pp_advantages(torch.tensor([1.0, -1.0]), mask)
    torch.testing.assert_close(adv, torch.tensor([[1.0, 1.0], [-1.0, -1.0]]), rtol=1e-5, atol=1e-5)
