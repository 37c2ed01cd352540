"""Re-packing generated sequences and minibatch selection."""

from __future__ import annotations

import torch

from distributed_pt.config import PPOSection
from distributed_pt.rl.engines import until_eos
from distributed_pt.rl.rollout import Experience, Samples, cat, normalised_scores, overlong_penalty, pack, take

PAD, EOS = 0, 3


def test_pack_right_pads_prompt_and_completion():
    # Prompts [5, 6] and [7, 8, 9]; completions "11 EOS" and "12 13 14" (no EOS), with the engine's log-probs.
    seqs, attn, action_mask, ended, logprobs = pack(
        [[5, 6], [7, 8, 9]], [[11, EOS], [12, 13, 14]], EOS, PAD, [[-0.5, -0.25], [-1.0, -2.0, -3.0]]
    )
    assert seqs.tolist() == [[5, 6, 11, EOS, PAD, PAD], [7, 8, 9, 12, 13, 14]]
    assert attn.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    # index t scores token t+1: row 0's actions are tokens 2..3, row 1's tokens 3..5
    assert action_mask.tolist() == [[0, 1, 1, 0, 0], [0, 0, 1, 1, 1]]
    assert logprobs.tolist() == [[0, -0.5, -0.25, 0, 0], [0, 0, -1.0, -2.0, -3.0]]
    assert ended.tolist() == [True, False]
    assert pack([[5]], [[EOS]], EOS, PAD)[4] is None  # no engine log-probs (hf)


def test_until_eos_keeps_the_first_eos():
    assert until_eos([4, EOS, PAD, EOS], EOS) == [4, EOS]
    assert until_eos([4, 5], EOS) == [4, 5]


def test_scores_are_normalised_penalised_and_clipped():
    ppo = PPOSection(reward_clip=2.0, no_eos_penalty=-1.0)
    raw = torch.tensor([3.0, 3.0, 100.0])
    ended = torch.tensor([True, False, True])
    scores = normalised_scores(raw, ended, {"mean": 1.0, "std": 2.0}, ppo)
    assert scores.tolist() == [1.0, 0.0, 2.0]


def test_select_trims_to_the_longest_row():
    B, L = 3, 6
    attn = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1] * 6])
    per_token = torch.arange(B * (L - 1), dtype=torch.float32).view(B, L - 1)
    exp = Experience(
        sequences=torch.arange(B * L).view(B, L), attention_mask=attn, action_mask=per_token, old_logprobs=per_token,
        ref_logprobs=per_token, values=per_token, rewards=per_token, advantages=per_token, returns=per_token,
        scores=torch.arange(3.0), raw_scores=torch.arange(3.0), ended=torch.ones(3, dtype=torch.bool),
        is_weights=per_token,
    )  # fmt: skip
    mb = exp.select(torch.tensor([1, 0]))
    assert mb.sequences.shape == (2, 4) and mb.old_logprobs.shape == (2, 3)
    assert mb.sequences[0].tolist() == [6, 7, 8, 9] and mb.scores.tolist() == [1.0, 0.0]


def test_overlong_penalty_hand_computed():
    # max 12 tokens, buffer 4: free up to 8, then -1/4 per token down to -1 at 12
    lengths = torch.tensor([3, 8, 9, 11, 12])
    assert overlong_penalty(lengths, 12, 4, 1.0).tolist() == [0.0, 0.0, -0.25, -0.75, -1.0]
    assert overlong_penalty(lengths, 12, 4, 0.5).tolist() == [0.0, 0.0, -0.125, -0.375, -0.5]


def test_take_and_cat_keep_rows_aligned():
    def samples(prompts, completions, logprobs):
        seqs, attn, mask, ended, lp = pack(prompts, completions, EOS, PAD, logprobs)
        return Samples(seqs, attn, mask, ended, [str(c) for c in completions], 1.0, lp, 0.5)

    a = samples([[5, 6], [7]], [[11, EOS], [12, 13, 14]], [[-1.0, -2.0], [-3.0, -4.0, -5.0]])
    b = samples([[8, 9, 10, 11]], [[15, 16, 17, EOS]], [[-6.0, -7.0, -8.0, -9.0]])
    both = cat([a, b], PAD)
    assert both.sequences.shape == (3, 8) and both.action_mask.shape == (3, 7)
    assert both.gen_time == 2.0 and both.sync_time == 1.0 and both.completions[2] == str([15, 16, 17, EOS])
    picked = take(both, [2, 0])
    want_b = pack([[8, 9, 10, 11], [5, 6]], [[15, 16, 17, EOS], [11, EOS]], EOS, PAD,
                  [[-6.0, -7.0, -8.0, -9.0], [-1.0, -2.0]])  # fmt: skip
    assert picked.sequences.tolist() == want_b[0].tolist() and picked.attention_mask.tolist() == want_b[1].tolist()
    assert picked.action_mask.tolist() == want_b[2].tolist() and picked.engine_logprobs.tolist() == want_b[4].tolist()
    assert picked.ended.tolist() == [True, True]
