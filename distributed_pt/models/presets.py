"""Architecture presets: the public Hugging Face config of well-known models, one YAML file each in configs/models/.

    model:
      preset: llama-3.1-8b   # alone: a random-init model of that exact architecture;
      path: /ckpt/llama8b    # with a path: the checkpoint's config.json is checked against the preset

A preset file holds the model's config.json keys as published (``rope_scaling``, ``tie_word_embeddings``, ... spelled
as Hugging Face spells them) plus ``parameters``, the exact parameter count, which `load_preset` strips. Counting and
planning build the model on the meta device: shapes only, nothing allocated, so a 70B model costs nothing.

    preset_names()                                   # ['gpt2', 'llama-3.1-70b', ...]
    preset_parameters("llama-3.1-8b")                # 8030261248, read from the file
    count_parameters(build_meta_model(load_preset("llama-3.1-8b")))   # the same, computed
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from distributed_pt.config import ConfigError
from distributed_pt.paths import bundled

# Beside the stage configs (the repository's configs/models/<name>.yaml, also in an installed package).
PRESET_DIR = bundled("configs/models")

# config.json keys that fix the weights' shapes and the forward computation: a preset used with `model.path` must agree
# with the checkpoint on each of them. Not compared: token ids, dtype, dropout, init range, and the context length of
# RoPE models (max_position_embeddings), which instruct releases change (Qwen2.5-7B 131072, -Instruct 32768).
# transformers 5 folds rope_theta and rope_scaling into rope_parameters; both spellings are listed, and both sides are
# parsed by the same config class, so a checkpoint saved by either major version compares equal.
ARCHITECTURE_KEYS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "attention_bias", "mlp_bias",
    "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters", "use_sliding_window",
    "n_embd", "n_layer", "n_head", "n_inner", "n_positions", "activation_function", "layer_norm_epsilon",
)  # fmt: skip


def preset_names() -> list[str]:
    """The presets on disk: the names of configs/models/*.yaml, sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_file(name: str) -> Path:
    """configs/models/<name>.yaml; an unknown name is a ConfigError that lists the known ones."""
    path = PRESET_DIR / f"{name}.yaml"
    if name not in preset_names():
        raise ConfigError(f"model.preset: unknown preset {name!r}; known presets: {', '.join(preset_names())}")
    return path


def _read(name: str) -> dict[str, Any]:
    path = preset_file(name)
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict) or "model_type" not in raw or not isinstance(raw.get("parameters"), int):
        raise ConfigError(f"{path}: a preset is a mapping with 'model_type' and an integer 'parameters'")
    return raw


def load_preset(name: str) -> dict[str, Any]:
    """The preset's Hugging Face config dict (config.json keys, without `parameters`); a fresh copy on every call."""
    return {k: v for k, v in _read(name).items() if k != "parameters"}


def preset_parameters(name: str) -> int:
    """The exact parameter count recorded in the preset file (tied embeddings counted once)."""
    return _read(name)["parameters"]


def hf_config(fields: dict[str, Any], key: str = "model.preset") -> PretrainedConfig:
    """A transformers config from a config.json-style dict with `model_type` (`parameters` is ignored)."""
    fields = {k: v for k, v in fields.items() if k != "parameters"}
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise ConfigError(f"{key}: needs 'model_type' (e.g. llama, qwen2, gpt2)")
    try:
        return AutoConfig.for_model(model_type, **fields)
    except Exception as e:  # transformers 5 validates configs with huggingface_hub's own error types
        raise ConfigError(f"{key}: {e}") from e


def build_meta_model(hf_config_dict: dict[str, Any]) -> torch.nn.Module:
    """`AutoModelForCausalLM.from_config` on the meta device: every parameter has its real shape and no storage."""
    config = hf_config(hf_config_dict)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters of `model`, shared (tied) tensors counted once, as Hugging Face model pages count them."""
    return sum(p.numel() for p in model.parameters())


def architecture(config: PretrainedConfig) -> dict[str, Any]:
    """The `ARCHITECTURE_KEYS` a config sets, plus its sliding window where the model uses one."""
    d = config.to_dict()
    arch = {k: d[k] for k in ARCHITECTURE_KEYS if k in d}
    if d.get("use_sliding_window", True) and d.get("sliding_window") is not None:
        arch["sliding_window"] = d["sliding_window"]
    return arch


def check_preset_matches(name: str, model_dir: str | Path) -> None:
    """ConfigError unless `model_dir`'s config.json has the preset's architecture; the message names every key that
    differs with both values, the preset file and the config.json."""
    config_json = Path(model_dir) / "config.json"
    if not config_json.is_file():
        raise ConfigError(f"model.path: '{model_dir}' has no config.json to check model.preset '{name}' against")
    try:
        theirs = json.loads(config_json.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"model.path: {config_json} is not valid JSON: {e}") from e
    ours, source = load_preset(name), preset_file(name)
    if theirs.get("model_type") != ours["model_type"]:  # a different family: its other keys cannot be compared
        want, got = {"model_type": ours["model_type"]}, {"model_type": theirs.get("model_type")}
    else:
        want, got = architecture(hf_config(ours)), architecture(hf_config(theirs, key=str(config_json)))
    missing = "<unset>"
    differ = [k for k in sorted(want.keys() | got.keys()) if want.get(k, missing) != got.get(k, missing)]
    if differ:
        diffs = "; ".join(
            f"{k} {want.get(k, missing)!r} (preset) vs {got.get(k, missing)!r} (config.json)" for k in differ
        )
        raise ConfigError(
            f"model.preset '{name}' ({source}) does not match {config_json}: {diffs}. Fix the preset name, or drop "
            "model.preset to load the checkpoint as it is"
        )
