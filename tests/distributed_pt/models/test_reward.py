"""Scalar-head reward model: last non-padding token with left and right padding, export round trip, score stats."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from distributed_pt.config import ConfigError, ModelConfig
from distributed_pt.models.heads import Backbone, last_token_index, sequence_rewards
from distributed_pt.models.loading import load_tokenizer
from distributed_pt.models.reward import load_reward_model, load_reward_stats, save_reward_stats

INIT = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig())


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return load_reward_model(ModelConfig(init_config=INIT, dtype="fp32"), tok).eval()


def test_last_token_index_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]


def test_rewards_do_not_depend_on_padding_side(model, tok):
    seqs = [tok("sort : b a =")["input_ids"], tok("reverse : cat dog bird fish =")["input_ids"]]
    alone = torch.stack(
        [sequence_rewards(Backbone(model), torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs]
    )
    for left in (False, True):
        tok.padding_side = "left" if left else "right"
        batch = tok.pad({"input_ids": seqs}, return_tensors="pt")
        rewards = sequence_rewards(Backbone(model), batch["input_ids"], batch["attention_mask"])
        torch.testing.assert_close(rewards, alone.squeeze(1), rtol=1e-4, atol=1e-5)
    tok.padding_side = "right"


def test_export_reloads_with_auto_class_and_gives_the_same_scores(model, tok, tmp_path):
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_labels == 1
    batch = tok(["add : 1 + 2 =", "sort : c a b ="], return_tensors="pt", padding=True)
    ours = sequence_rewards(Backbone(model), batch["input_ids"], batch["attention_mask"])
    # The reloaded model's own pooling agrees (the demo tokenizer's pad token is distinct from EOS).
    torch.testing.assert_close(reloaded(**batch).logits.squeeze(-1), ours, rtol=1e-5, atol=1e-5)


def test_needs_a_model(tok):
    with pytest.raises(ConfigError, match="model: set 'path'"):
        load_reward_model(ModelConfig(), tok)


def test_reward_stats_round_trip(tmp_path):
    assert load_reward_stats(tmp_path) is None
    save_reward_stats(tmp_path, -0.25, 1.5)
    assert load_reward_stats(tmp_path) == {"mean": -0.25, "std": 1.5}
