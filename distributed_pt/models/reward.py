"""Reward / value models: a causal LM backbone with a scalar head (HF `*ForSequenceClassification`, num_labels=1).

The HF layout means an exported model reloads with `AutoModelForSequenceClassification.from_pretrained`. Scores are
read by us, not by HF's pooling (which finds the last token by comparing ids with pad_token_id and so misreads
sequences whose EOS doubles as padding): `token_scores` gives the head's output at every position (B, T) — the
per-token values a PPO critic needs — and `sequence_rewards` the score at the last non-padding token, correct with
left or right padding.
"""

from __future__ import annotations

import types

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

from distributed_pt.config import ConfigError, ModelConfig
from distributed_pt.models.loading import (
    DTYPES,
    attention_implementation,
    build_config,
    enable_gradient_checkpointing,
    local_dir,
)


def load_reward_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module:
    """A scalar-head model from `model.path` (an SFT output, any HF causal LM, or a reward model) or `init_config`."""
    kwargs = {"dtype": DTYPES[cfg.dtype], "attn_implementation": attention_implementation(cfg), "num_labels": 1}
    if cfg.path is not None:
        path = local_dir(cfg.path, "model.path")
        model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True, **kwargs)
    elif cfg.init_config:
        config = build_config(cfg.init_config, tokenizer)
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config, dtype=kwargs["dtype"])
    else:
        raise ConfigError("model: set 'path' (a local HF model directory) or 'init_config' (a model config dict)")
    if not isinstance(getattr(model, "score", None), torch.nn.Linear):
        raise ConfigError(f"model: {type(model).__name__} has no linear 'score' head; it cannot be a reward model")
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    enable_token_scores(model)
    return model


def enable_token_scores(model: torch.nn.Module) -> None:
    """Let `model(..., token_scores=True)` return the head's score at every position, (B, T) float32.

    It runs inside the root module's forward, so DeepSpeed ZeRO-3 gathers the backbone and head as usual.
    """
    original = model.forward

    def forward(self, input_ids=None, attention_mask=None, token_scores: bool = False, **kwargs):
        if not token_scores:
            return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = self.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.score(hidden).squeeze(-1).float()

    model.forward = types.MethodType(forward, model)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask → (B,) index of the last non-padding position (works for left and right padding)."""
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(-1)


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) scores at each sequence's last non-padding token."""
    scores = model(input_ids=input_ids, attention_mask=attention_mask, token_scores=True)
    return scores.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)
