"""Sequence log-probs over response tokens, and the reference read without dropout."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distributed_pt.config import DataConfig, ModelConfig
from distributed_pt.data.io import Row
from distributed_pt.data.packing import collate_packed_dpo
from distributed_pt.data.preference import build_pairs, collate_dpo_pairs
from distributed_pt.models.heads import Backbone
from distributed_pt.models.loading import load_tokenizer
from distributed_pt.rl.logprobs import reference_logprobs, segment_sums, token_logprobs


def _model(dropout: float = 0.0) -> Backbone:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, attention_dropout=dropout)  # fmt: skip
    return Backbone(LlamaForCausalLM(cfg).float())


ROWS = [
    Row({"prompt": "sort : b a =", "chosen": "a b", "rejected": "b a b"}, "x"),
    Row({"prompt": "add : 1 + 2 =", "chosen": "3", "rejected": "4 4 4 4"}, "y"),
    Row({"prompt": "reverse : cat dog =", "chosen": "dog cat", "rejected": "cat"}, "z"),
]


def _sums(model, batch, response, segment, n):
    logp = token_logprobs(model, batch.input_ids % 128, batch.model_mask, 1.0, False, batch.position_ids)[0]
    return segment_sums(logp, response, segment, 2 * n)


def test_sequence_logprobs_sum_the_response_tokens_of_each_side():
    tok = load_tokenizer(ModelConfig())
    pairs, _ = build_pairs(tok, ROWS, DataConfig(), False, prompt_first=True)
    model = _model().eval()
    got = _sums(model, *collate_dpo_pairs(pairs, tok.pad_token_id), len(pairs))
    # by hand: each sequence alone, unpadded, log-softmax of the full logits at the response positions
    sides = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    starts = [p.prompt_length for p in pairs] * 2
    for i, (seq, start) in enumerate(zip(sides, starts, strict=True)):
        x = torch.tensor([seq]) % 128
        logits = model.module(input_ids=x).logits.log_softmax(-1)[0]
        want = sum(logits[j - 1, x[0, j]] for j in range(start, len(seq)))
        assert torch.allclose(got[i], want, atol=1e-5), (i, got[i], want)


def test_packed_pairs_give_the_padded_pairs_log_probs():
    """Two pairs in one packed row and one in another (position ids restarting, no attention across samples): the
    same sequence log-probs, in the same order, as the padded batch."""
    tok = load_tokenizer(ModelConfig())
    pairs, _ = build_pairs(tok, ROWS, DataConfig(), False, prompt_first=True)
    model = _model().eval()
    padded = _sums(model, *collate_dpo_pairs(pairs, tok.pad_token_id), 3)
    packed_batch, response, segment = collate_packed_dpo([pairs[:2], pairs[2:]], tok.pad_token_id)
    assert packed_batch.model_mask is None and int(segment.max()) == 5
    packed = _sums(model, packed_batch, response, segment, 3)
    assert torch.allclose(packed, padded, atol=1e-5), (packed, padded)


def test_reference_logprobs_run_without_dropout_and_restore_the_mode():
    model = _model(dropout=0.5).train()
    ids = torch.randint(0, 128, (2, 9))
    mask = torch.ones_like(ids)
    first = reference_logprobs(model, model, ids, mask, 1.0, fused=False)
    assert torch.equal(first, reference_logprobs(model, model, ids, mask, 1.0, fused=False))
    assert model.training
