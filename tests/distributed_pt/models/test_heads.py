"""The explicit heads: the SFT loss on hand-computed cases (shifted by one, IGNORE_INDEX skipped, all-ignored gives
0); the fused LM-head loss and log-probs against the logits path, values and every gradient, on llama, qwen2 and
gpt2 (Triton interpreter on CPU); scores through the Backbone; HF models left unpatched."""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from distributed_pt.data.collate import Batch
from distributed_pt.data.sft import IGNORE_INDEX
from distributed_pt.models.heads import (
    Backbone,
    lm_loss,
    masked_token_mean,
    sequence_rewards,
    shift_labels,
    token_scores,
    use_fused_loss,
)
from distributed_pt.rl.logprobs import token_logprobs

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


CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4),  # tied embeddings
}


def _model(kind: str, vocab: int = 1001, cls=AutoModelForCausalLM):
    cfg = dict(CONFIGS[kind])
    torch.manual_seed(0)
    config = AutoConfig.for_model(cfg.pop("model_type"), vocab_size=vocab, num_labels=1, pad_token_id=0, **cfg)
    return cls.from_config(config).eval()  # no dropout: both paths must see the same network


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1001, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    labels = ids.clone()
    labels[:, :5] = I  # prompt
    labels[mask == 0] = I
    return ids, mask, labels


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_plain_loss_and_grads_equal_the_hf_forward_logits(kind):
    # The plain path sends only the labelled positions through the LM head; HF's logits cover every position.
    model, reference = _model(kind).double(), _model(kind).double()
    ids, mask, labels = _batch()
    loss = lm_loss(Backbone(model), Batch(ids, mask, labels), fused=False)
    expected = masked_token_mean(reference(input_ids=ids, attention_mask=mask).logits, labels)
    torch.testing.assert_close(loss, expected.float(), rtol=1e-6, atol=0)
    loss.backward()
    expected.backward()
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_plain_loss_with_no_labelled_position_is_zero_with_zero_grads(reduction):
    # e.g. a sequence-parallel shard that holds only prompt tokens: no row reaches the LM head
    model = _model("llama")
    ids, mask, labels = _batch()
    loss = lm_loss(Backbone(model), Batch(ids, mask, torch.full_like(labels, I)), fused=False, reduction=reduction)
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is None or (p.grad == 0).all() for p in model.parameters())


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_fused_loss_and_grads_equal_plain_path(kind):
    plain, fused = _model(kind), _model(kind)
    assert use_fused_loss("true", fused) and not use_fused_loss("false", fused)
    ids, mask, labels = _batch()
    loss_plain = lm_loss(Backbone(plain), Batch(ids, mask, labels), fused=False)
    loss_fused = lm_loss(Backbone(fused), Batch(ids, mask, labels), fused=True)
    torch.testing.assert_close(loss_fused, loss_plain, rtol=1e-5, atol=1e-5)
    loss_plain.backward()
    loss_fused.backward()
    grads = dict(fused.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    if kind == "gpt2":
        assert fused.lm_head.weight is fused.transformer.wte.weight


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_fused_logprobs_and_entropy_equal_plain_path(kind):
    plain, fused = _model(kind), _model(kind)
    ids, mask, _ = _batch()
    want = token_logprobs(Backbone(plain), ids, mask, temperature=0.7, fused=False)
    got = token_logprobs(Backbone(fused), ids, mask, temperature=0.7, fused=True)
    logits = plain(input_ids=ids, attention_mask=mask).logits[:, :-1].float() / 0.7
    expected = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(want[0], expected)
    for w, g in zip(want, got, strict=True):
        assert g.shape == (3, 12)
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    (want[0].sum() + want[1].sum()).backward()
    (got[0].sum() + got[1].sum()).backward()
    grads = dict(fused.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_scores_read_the_score_head_at_every_position_and_the_last_real_token():
    model = _model("llama", cls=AutoModelForSequenceClassification)
    backbone = Backbone(model)
    assert backbone.head is model.score
    ids, mask, _ = _batch()
    scores = token_scores(backbone, ids, mask)
    assert scores.shape == (3, 13) and scores.dtype == torch.float32
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(scores, model.score(hidden).squeeze(-1))
    torch.testing.assert_close(
        sequence_rewards(backbone, ids, mask), scores[torch.arange(3), torch.tensor([12, 8, 12])]
    )


def test_hf_models_are_left_unpatched_and_still_generate():
    model = _model("llama")
    backbone = Backbone(model)
    assert backbone.head is model.lm_head and "forward" not in vars(model)
    assert type(model.lm_head) is torch.nn.Linear
    ids = torch.randint(0, 1001, (2, 5))
    assert model(input_ids=ids).logits.shape == (2, 5, 1001)
    assert model.generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape == (2, 8)


def test_sum_reduction_is_the_mean_times_the_targets():
    model = _model("llama")
    ids, mask, labels = _batch()
    batch = Batch(ids, mask, labels)
    for fused in (False, True):
        mean, total = (lm_loss(Backbone(model), batch, fused, reduction=r) for r in ("mean", "sum"))
        torch.testing.assert_close(total, mean * batch.num_targets, rtol=1e-5, atol=1e-5)
