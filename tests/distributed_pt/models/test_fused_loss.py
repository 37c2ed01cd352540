"""The SFT loss through the fused LM-head kernel equals the plain logits path (Triton interpreter on CPU)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from transformers import AutoModelForCausalLM

from distributed_pt.losses.sft import causal_lm_loss
from distributed_pt.models.fused_loss import FusedLossHead, enable_fused_loss

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


def _model(kind: str, vocab: int = 1001):
    from transformers import AutoConfig

    cfg = dict(CONFIGS[kind])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), vocab_size=vocab, **cfg))
    return model.eval()  # no dropout: both paths must see the same network


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_fused_loss_and_grads_equal_plain_path(kind):
    plain, fused = _model(kind), _model(kind)
    assert enable_fused_loss(fused)
    assert isinstance(fused.get_output_embeddings(), FusedLossHead)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1001, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    labels = ids.clone()
    labels[:, :5] = -100  # prompt
    labels[mask == 0] = -100
    loss_plain = causal_lm_loss(plain, ids, mask, labels, fused=False)
    loss_fused = causal_lm_loss(fused, ids, mask, labels, fused=True)
    torch.testing.assert_close(loss_fused, loss_plain, rtol=1e-5, atol=1e-5)
    loss_plain.backward()
    loss_fused.backward()
    grads = dict(fused.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    if kind == "gpt2":
        assert fused.lm_head.weight is fused.transformer.wte.weight


def test_patched_model_still_generates_and_returns_logits():
    model = _model("llama")
    enable_fused_loss(model)
    ids = torch.randint(0, 1001, (2, 5))
    assert model(input_ids=ids).logits.shape == (2, 5, 1001)
    assert model.generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape == (2, 8)
