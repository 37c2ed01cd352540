"""The SFT loss on small hand-computed cases: shifted by one, -100 ignored, all-ignored gives 0."""

from __future__ import annotations

import math

import pytest
import torch

from distributed_pt.data.sft import IGNORE_INDEX
from distributed_pt.losses.sft import causal_lm_loss, masked_token_mean, shift_labels

I = IGNORE_INDEX


def test_shift_labels():
    labels = torch.tensor([[I, 5, 6, 7], [1, 2, I, I]])
    assert shift_labels(labels).tolist() == [[5, 6, 7, I], [2, I, I, I]]


def test_hand_computed_case():
    # V=2. Position t predicts label t+1. Logits chosen so each CE is a closed form.
    #   b0: labels [I, 0, 1]  → targets [0, 1, I]
    #       t0 logits (0, 0)        → CE = log 2
    #       t1 logits (0, log 3)    → p(1) = 3/4 → CE = log(4/3)
    #       t2 ignored
    #   b1: labels [1, I, 0]  → targets [I, 0, I]
    #       t1 logits (log 3, 0)    → p(0) = 3/4 → CE = log(4/3)
    logits = torch.tensor(
        [
            [[0.0, 0.0], [0.0, math.log(3)], [9.0, -9.0]],
            [[5.0, 1.0], [math.log(3), 0.0], [-4.0, 2.0]],
        ]
    )
    labels = torch.tensor([[I, 0, 1], [1, I, 0]])
    expected = (math.log(2) + 2 * math.log(4 / 3)) / 3
    assert masked_token_mean(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_label_on_the_first_position_is_never_a_target():
    # labels[:, 0] has no logits predicting it; changing it must not change the loss.
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    other = labels.clone()
    other[:, 0] = (labels[:, 0] + 1) % 7
    torch.testing.assert_close(masked_token_mean(logits, labels), masked_token_mean(logits, other))
    # The last position's logits predict nothing either.
    bumped = logits.clone()
    bumped[:, -1] += 100 * torch.randn(2, 7)
    torch.testing.assert_close(masked_token_mean(bumped, labels), masked_token_mean(logits, labels))


def test_matches_token_mean_cross_entropy():
    torch.manual_seed(1)
    logits = torch.randn(3, 6, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 6))
    labels[0, :3] = I
    labels[2, 4:] = I
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=I)
    torch.testing.assert_close(masked_token_mean(logits, labels).double(), ref.double(), rtol=1e-6, atol=1e-6)


def test_all_ignored_is_zero_not_nan_and_has_a_gradient():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    loss = masked_token_mean(logits, torch.full((2, 4), I))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad == 0).all()


def test_bf16_logits_are_computed_in_float32():
    torch.manual_seed(2)
    logits = torch.randn(2, 5, 9)
    labels = torch.randint(0, 9, (2, 5))
    loss = masked_token_mean(logits.bfloat16(), labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, masked_token_mean(logits.bfloat16().float(), labels))


def test_causal_lm_loss_unfused_uses_the_model_logits():
    class Model(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits
            self.seen = {}

        def forward(self, input_ids, attention_mask, use_cache):
            self.seen = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache}
            return type("Out", (), {"logits": self.logits})()

    torch.manual_seed(3)
    logits = torch.randn(1, 4, 6)
    labels = torch.tensor([[I, 2, 3, 4]])
    model = Model(logits)
    ids, mask = torch.tensor([[1, 2, 3, 4]]), torch.ones(1, 4, dtype=torch.long)
    loss = causal_lm_loss(model, ids, mask, labels, fused=False)
    torch.testing.assert_close(loss, masked_token_mean(logits, labels))
    assert model.seen["use_cache"] is False and model.seen["input_ids"] is ids
