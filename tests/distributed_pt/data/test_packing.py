"""Packing: the bin rule, packed batches, and the loss of a packed row equal to its samples' losses run one by one
(values and every gradient, fp32) for llama, qwen2 and gpt2 (absolute positions), with LoRA and the fused head."""

from __future__ import annotations

import copy
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from distributed_pt.config import LoraConfig
from distributed_pt.data.collate import collate
from distributed_pt.data.packing import collate_packed, collate_packed_pairs, pack
from distributed_pt.data.preference import PairExample
from distributed_pt.data.sft import IGNORE_INDEX, Example
from distributed_pt.models.heads import Backbone, lm_loss, sequence_rewards, token_scores
from distributed_pt.models.lora import apply_lora

I = IGNORE_INDEX
CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "qwen2": dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4),
}  # fmt: skip


def _model(kind: str, cls=AutoModelForCausalLM, attn: str = "sdpa"):
    cfg = dict(CONFIGS[kind])
    torch.manual_seed(0)
    config = AutoConfig.for_model(cfg.pop("model_type"), vocab_size=101, num_labels=1, pad_token_id=0, **cfg)
    return cls.from_config(config, attn_implementation=attn).eval()


def _samples(lengths=(7, 3, 11, 5), seed=1) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, 101, (n,), generator=g).tolist()
        prompt = n // 3
        out.append(Example(ids, [I] * prompt + ids[prompt:], f"sample:{n}"))
    return out


def test_pack_fills_rows_in_order_and_is_deterministic():
    lengths = np.array([5, 9, 2, 7, 3, 8, 1, 6])
    rows = pack(lengths, max_length=10, seed=3)
    assert sorted(i for row in rows for i in row) == list(range(8))
    assert all(lengths[row].sum() <= 10 for row in rows)
    assert rows == pack(lengths, max_length=10, seed=3) and rows != pack(lengths, max_length=10, seed=4)
    assert pack([12, 3], max_length=10, seed=0) in ([[0], [1]], [[1], [0]])  # too long: a row of its own


def test_collate_packed_restarts_positions_and_never_targets_a_sample_start():
    a, b = Example([1, 2, 3], [I, 2, 3], "a"), Example([4, 5], [4, 5], "b")
    batch = collate_packed([[a, b], [b]], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [4, 5, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch.labels.tolist() == [[I, 2, 3, I, 5], [I, 5, I, I, I]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch.model_mask is None and batch.num_sequences == 3 and batch.num_tokens == 7 and batch.num_targets == 4


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("variant", ["full", "lora", "fused"])
def test_packed_row_loss_and_grads_equal_the_samples_one_by_one(kind, variant):
    if variant == "fused" and kind != "llama":
        pytest.skip("the fused head is covered on llama; the attention path is the same for every kind")
    model = _model(kind)
    if variant == "lora":
        targets = ["c_attn", "c_proj", "c_fc"] if kind == "gpt2" else LoraConfig().target_modules
        apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=targets))
        with torch.no_grad():  # B = 0 would hide the adapter path
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.1)
    fused = variant == "fused"
    one_by_one, packed = Backbone(model), Backbone(copy.deepcopy(model))
    samples = _samples()
    total = sum(lm_loss(one_by_one, collate([s], 0), fused, reduction="sum") for s in samples)
    got = lm_loss(packed, collate_packed([samples[:2], samples[2:]], 0), fused, reduction="sum")
    torch.testing.assert_close(got, total, rtol=1e-5, atol=1e-5)
    total.backward()
    got.backward()
    want, have = _grads(one_by_one), _grads(packed)
    assert want.keys() == have.keys() and want
    for name in want:
        torch.testing.assert_close(have[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_packing_changes_the_loss_without_position_restarts():
    """The test above can fail: the same row with positions running on (one long sequence) gives another loss."""
    model = Backbone(_model("llama"))
    samples = _samples()
    batch = collate_packed([samples], 0)
    isolated = lm_loss(model, batch, False, reduction="sum")
    batch.position_ids = None  # a plain causal mask over the whole row
    assert (lm_loss(model, batch, False, reduction="sum") - isolated).abs() > 1e-3


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_packed_pairs_give_each_sides_reward(kind):
    model = Backbone(_model(kind, AutoModelForSequenceClassification))
    s = _samples((6, 4, 9, 5))
    pairs = [
        PairExample(s[0].input_ids, s[1].input_ids, 0.5, "p0"),
        PairExample(s[2].input_ids, s[3].input_ids, 1.0, "p1"),
    ]
    batch, chosen_at, rejected_at, margin = collate_packed_pairs([[pairs[0]], [pairs[1]]], pad_id=0)
    scores = token_scores(model, batch.input_ids, None, batch.position_ids)
    for k, p in enumerate(pairs):
        for side, at in ((p.chosen, chosen_at), (p.rejected, rejected_at)):
            alone = sequence_rewards(model, torch.tensor([side]), torch.ones(1, len(side), dtype=torch.long))
            torch.testing.assert_close(scores[at[k, 0], at[k, 1]], alone[0], rtol=1e-5, atol=1e-5)
    assert margin.tolist() == [0.5, 1.0]
