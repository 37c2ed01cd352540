"""The critic-free stage's rollout batches in one process: DAPO's dynamic sampling fills the batch from extra rollouts
and keeps only informative groups, overlong shaping adds its penalty, the estimator choice, the batch std. (Two ranks
in step: tests/distributed_pt/stages/test_grpo.py.)"""

from __future__ import annotations

import pytest
import torch

from distributed_pt.config import GRPOSection
from distributed_pt.rl.groups import Rollout, dynamic_sample, estimate_advantages, global_std, overlong_shaped
from distributed_pt.rl.rollout import Samples, pack

PAD, EOS, G = 0, 3, 2


def rollout(rewards: list[float], lengths: list[int] | None = None) -> Rollout:
    """A rollout of len(rewards) completions (groups of G), completion i of `lengths[i]` tokens (ending in EOS)."""
    lengths = lengths or [2] * len(rewards)
    completions = [[7] * (n - 1) + [EOS] for n in lengths]
    seqs, attn, mask, ended, _ = pack([[5, 6]] * len(rewards), completions, EOS, PAD)
    samples = Samples(seqs, attn, mask, ended, [f"c{r}" for r in rewards], 1.0)
    total = torch.tensor(rewards, dtype=torch.float32)
    return Rollout(samples, total, {"fn": total.clone()}, [f"p{i // G}" for i in range(len(rewards))])


def test_dynamic_sampling_fills_the_batch_with_informative_groups():
    # want 3 groups; rollout 1 has 1 informative group of 3, rollout 2 has 2 of 3: full after one extra rollout
    batches = iter([rollout([1, 1, 0, 1, 0, 0]), rollout([0, 1, 2, 2, 1, 0]), rollout([0, 1] * 3)])
    grpo = GRPOSection(num_generations=G, rollout_batch_size=3, max_extra_rollouts=5)
    batch, stats = dynamic_sample(lambda: next(batches), grpo, PAD)
    assert batch.total.tolist() == [0, 1, 0, 1, 1, 0]
    assert batch.per_source["fn"].tolist() == batch.total.tolist()
    assert batch.texts == ["p1", "p1", "p0", "p0", "p2", "p2"]
    assert batch.samples.completions == ["c0", "c1", "c0", "c1", "c1", "c0"]
    assert stats == {"dropped_group_fraction": pytest.approx(3 / 6), "extra_rollouts": 1.0, "groups": 3.0}
    assert batch.total.view(-1, G).std(1).gt(0).all()


def test_dynamic_sampling_stops_at_its_bound_and_keeps_what_it_has():
    batches = iter([rollout([1, 1, 0, 1]), rollout([2, 2, 0, 0]), rollout([0, 1, 0, 1])])
    grpo = GRPOSection(num_generations=G, rollout_batch_size=2, max_extra_rollouts=1)
    batch, stats = dynamic_sample(lambda: next(batches), grpo, PAD)
    assert batch.total.tolist() == [0, 1] and stats["extra_rollouts"] == 1.0 and stats["groups"] == 1.0
    assert next(batches).total.tolist() == [0, 1, 0, 1]  # the third rollout was never drawn


def test_dynamic_sampling_without_any_signal_keeps_the_first_rollout():
    batches = iter([rollout([1, 1, 0, 0]), rollout([2, 2, 3, 3])])
    grpo = GRPOSection(num_generations=G, rollout_batch_size=2, max_extra_rollouts=1)
    batch, stats = dynamic_sample(lambda: next(batches), grpo, PAD)
    assert batch.total.tolist() == [1, 1, 0, 0] and stats["dropped_group_fraction"] == 1.0 and stats["groups"] == 2


def test_overlong_shaping_is_a_reward_source():
    grpo = GRPOSection(max_new_tokens=6, overlong_buffer=2, overlong_penalty=1.0)
    batch = overlong_shaped(rollout([1.0, 1.0], lengths=[3, 5]), grpo)
    assert batch.per_source["overlong"].tolist() == [0.0, -0.5] and batch.total.tolist() == [1.0, 0.5]
    assert overlong_shaped(rollout([1.0, 1.0]), GRPOSection()).per_source.keys() == {"fn"}  # off by default


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_estimate_advantages_dispatches(estimator):
    total, mask = torch.tensor([0.0, 1.0, 2.0, 2.0]), torch.ones(4, 3)
    adv = estimate_advantages(total, mask, None, None, GRPOSection(num_generations=G, advantage_estimator=estimator))
    assert adv.shape == ((4,) if estimator in ("grpo", "rloo") else (4, 3))
    if estimator == "rloo":
        assert adv.tolist() == [-1.0, 1.0, 0.0, 0.0]


def test_global_std_is_the_unbiased_std_of_the_batch():
    x = torch.tensor([0.0, 1.0, 3.0, 4.0])
    assert global_std(x) == pytest.approx(x.std().item())  # one process: the batch is this rank's values
