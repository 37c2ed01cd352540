"""Load Hugging Face causal LMs and tokenizers from local directories, or build random-init models from a config.

Nothing is downloaded: every `from_pretrained` runs with ``local_files_only=True``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from distributed_pt.config import DEMO_DIR, ConfigError, LoraConfig, ModelConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def local_dir(path: str, key: str) -> str:
    if not Path(path).is_dir():
        raise ConfigError(f"{key}: '{path}' is not a local directory (models and tokenizers load from disk only)")
    return path


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer from `model.tokenizer`, else `model.path`, else the bundled demo tokenizer."""
    key, path = "model.tokenizer", cfg.tokenizer
    if path is None and cfg.path is not None:
        key, path = "model.path", cfg.path
    if path is None:
        path = str(DEMO_DIR / "tokenizer")
    tok = AutoTokenizer.from_pretrained(local_dir(path, key), local_files_only=True)
    if tok.eos_token_id is None:
        raise ConfigError(f"{key}: the tokenizer at '{path}' has no EOS token; set one in its tokenizer_config.json")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def attention_implementation(cfg: ModelConfig) -> str:
    if cfg.attn_implementation != "auto":
        if cfg.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("model.attn_implementation: flash_attention_2 needs the flash-attn package installed")
        return cfg.attn_implementation
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module:
    """A causal LM from `model.path`, or random-init from `model.init_config`; vocab checked against the tokenizer."""
    kwargs = {"dtype": DTYPES[cfg.dtype], "attn_implementation": attention_implementation(cfg)}
    if cfg.path is not None:
        if cfg.init_config:
            raise ConfigError("model: set either 'path' (a pretrained model) or 'init_config' (random init), not both")
        model = AutoModelForCausalLM.from_pretrained(local_dir(cfg.path, "model.path"), local_files_only=True, **kwargs)
    elif cfg.init_config:
        model = AutoModelForCausalLM.from_config(build_config(cfg.init_config, tokenizer), **kwargs)
    else:
        raise ConfigError("model: set 'path' (a local HF model directory) or 'init_config' (a model config dict)")
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ConfigError(
            f"model: its vocabulary ({model.get_input_embeddings().num_embeddings}) is smaller than the tokenizer's "
            f"({len(tokenizer)}); they do not belong together"
        )
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def build_config(init_config: dict, tokenizer: PreTrainedTokenizerBase):
    """A transformers config from a dict with `model_type`; token ids and vocab size default to the tokenizer's."""
    fields = dict(init_config)
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise ConfigError("model.init_config: needs 'model_type' (e.g. llama, qwen2, gpt2)")
    fields.setdefault("vocab_size", len(tokenizer))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        fields.setdefault(name, getattr(tokenizer, name))
    try:
        return AutoConfig.for_model(model_type, **fields)
    except Exception as e:  # transformers 5 validates configs with huggingface_hub's own error types
        raise ConfigError(f"model.init_config: {e}") from e


def make_trainable(model: torch.nn.Module, lora: LoraConfig, gradient_checkpointing: bool, name: str = "model") -> None:
    """Full fine-tuning, or LoRA adapters on `lora.target_modules` (base frozen); prints what trains on rank 0."""
    from distributed_pt import dist
    from distributed_pt.models.lora import apply_lora, count_trainable, prepare_for_gradient_checkpointing

    if lora.enabled:
        targets = apply_lora(model, lora)
        if gradient_checkpointing:
            prepare_for_gradient_checkpointing(model)
        dist.print0(f"{name}: LoRA r={lora.r} alpha={lora.alpha} on {len(targets)} layers")
    trainable, total = count_trainable(model)
    dist.print0(f"{name}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")


def check_same_tokenizer(tokenizer: PreTrainedTokenizerBase, path: str | None, key: str) -> None:
    """A model that reads the policy's tokens (a reward model, a critic) must share its vocabulary and chat template,
    or it scores garbage. `path` without a tokenizer is not checked."""
    if path is None or not (Path(path) / "tokenizer_config.json").is_file():
        return
    other = load_tokenizer(ModelConfig(path=path))
    if other.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"{key}: the tokenizer at '{path}' has a different vocabulary from the policy's")
    if other.chat_template != tokenizer.chat_template:
        raise ConfigError(f"{key}: the tokenizer at '{path}' has a different chat template from the policy's")
