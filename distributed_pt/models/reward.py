"""Reward / value models: a causal LM backbone with a scalar head (HF `*ForSequenceClassification`, num_labels=1),
and the score statistics a reward model is exported with.

The HF layout means an exported model reloads with `AutoModelForSequenceClassification.from_pretrained`. Scores are
read through `models.heads` (`token_scores` at every position, `sequence_rewards` at the last non-padding token).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

from distributed_pt.config import ConfigError, ModelConfig
from distributed_pt.models.loading import (
    DTYPES,
    attention_implementation,
    check_model_source,
    enable_gradient_checkpointing,
    init_model_config,
    warn_remote_code,
)


def load_reward_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module:
    """A scalar-head model from `model.path` (an SFT output, any HF causal LM, or a reward model; checked against
    `model.preset` when both are set), or random-init from `model.preset` or `model.init_config`."""
    kwargs = {"dtype": DTYPES[cfg.dtype], "attn_implementation": attention_implementation(cfg), "num_labels": 1}
    check_model_source(cfg)
    if cfg.path is not None:
        warn_remote_code(cfg, cfg.path, "model")
        with quiet_transformers():  # its LOAD REPORT lists an SFT model's missing head as if it were a fault
            model, info = AutoModelForSequenceClassification.from_pretrained(
                cfg.path, local_files_only=True, trust_remote_code=cfg.trust_remote_code, output_loading_info=True,
                **kwargs,
            )  # fmt: skip
        report_loading(cfg.path, info)
    else:
        config = init_model_config(cfg, tokenizer)
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config, dtype=kwargs["dtype"])
    if not isinstance(getattr(model, "score", None), torch.nn.Linear):
        raise ConfigError(f"model: {type(model).__name__} has no linear 'score' head; it cannot be a reward model")
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def report_loading(path: str, info: dict[str, list]) -> None:
    """Say once, on rank 0 and in plain words, what loading `path` as a scalar-head model did not find."""
    from distributed_pt import dist

    missing = list(info.get("missing_keys", []))
    if any(k.startswith("score.") for k in missing):
        dist.print0(f"model: '{path}' has no scalar head yet (a causal LM, e.g. an SFT output): 'score' starts from "
                    "random init, as expected for a new reward model or critic")  # fmt: skip
    others = [k for k in missing if not k.startswith("score.")]
    if others:
        dist.print0(f"warning: '{path}' lacks {len(others)} weights, initialised at random: {', '.join(others[:8])}")


@contextmanager
def quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


REWARD_STATS = "reward_stats.json"  # beside a reward model: the eval reward mean/std that PPO normalises scores with


def save_reward_stats(model_dir: str | Path, mean: float, std: float) -> None:
    (Path(model_dir) / REWARD_STATS).write_text(json.dumps({"mean": mean, "std": std}, indent=1))


def load_reward_stats(model_dir: str | Path) -> dict[str, float] | None:
    """{"mean", "std"} saved with a reward model, or None when it has none."""
    path = Path(model_dir) / REWARD_STATS
    return json.loads(path.read_text()) if path.is_file() else None
