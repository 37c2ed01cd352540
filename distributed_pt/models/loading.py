"""Load Hugging Face causal LMs and tokenizers from local directories, or build random-init models from a config.

Where a model comes from (`model.*`): `path` (a local HF directory: one safetensors file, or shards with their
``model.safetensors.index.json``), `init_config` (a config dict, random init) or `preset` (a named public architecture
in configs/models/, random init at the real size; with `path` it is instead checked against the path's config.json).
Nothing is downloaded: every `from_pretrained` runs with ``local_files_only=True``, and with
``trust_remote_code=model.trust_remote_code`` (False unless the config sets it).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from distributed_pt import dist
from distributed_pt.config import DEMO_DIR, ConfigError, LoraConfig, ModelConfig
from distributed_pt.data.io import tokenizer_digest
from distributed_pt.models.presets import check_preset_matches, hf_config, load_preset

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SPECIAL_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


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
    warn_remote_code(cfg, path, "tokenizer")
    tok = AutoTokenizer.from_pretrained(
        local_dir(path, key), local_files_only=True, trust_remote_code=cfg.trust_remote_code
    )
    if tok.eos_token_id is None:
        raise ConfigError(f"{key}: the tokenizer at '{path}' has no EOS token; set one in its tokenizer_config.json")
    saved = Path(cfg.path) if cfg.path is not None and cfg.tokenizer is not None else None
    if saved is not None and any((saved / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        theirs = AutoTokenizer.from_pretrained(saved, local_files_only=True, trust_remote_code=cfg.trust_remote_code)
        if tokenizer_digest(theirs) != tokenizer_digest(tok):
            dist.print0(
                f"warning: model.tokenizer ({path}, {len(tok)} tokens) is not the tokenizer saved with model.path "
                f"({saved}, {len(theirs)} tokens): the model learned the saved one's ids"
            )
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
    """A causal LM from `model.path` (checked against `model.preset` when both are set), or random-init from
    `model.preset` or `model.init_config`; its vocabulary is checked against the tokenizer's."""
    kwargs = {"dtype": DTYPES[cfg.dtype], "attn_implementation": attention_implementation(cfg)}
    check_model_source(cfg)
    if cfg.path is not None:
        warn_remote_code(cfg, cfg.path, "model")
        model = AutoModelForCausalLM.from_pretrained(
            cfg.path, local_files_only=True, trust_remote_code=cfg.trust_remote_code, **kwargs
        )
    else:
        model = AutoModelForCausalLM.from_config(init_model_config(cfg, tokenizer), **kwargs)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ConfigError(
            f"model: its vocabulary ({model.get_input_embeddings().num_embeddings}) is smaller than the tokenizer's "
            f"({len(tokenizer)}); they do not belong together"
        )
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.tiled_mlp:
        tile_mlps(model, cfg.tiled_mlp)
    if cfg.offload_activations:
        if not cfg.gradient_checkpointing:
            raise ConfigError("model.offload_activations: offloads gradient checkpointing's layer inputs; set "
                              "model.gradient_checkpointing=true")  # fmt: skip
        offload_activations(model)
    return model


def offload_activations(model: torch.nn.Module) -> None:
    """What the transformer body saves for the backward (with gradient checkpointing: each layer's input) goes to
    host memory, pinned on CUDA, and comes back when the backward reaches it (`torch.autograd.graph.save_on_cpu`)."""
    body = model.base_model
    own = body.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return own(*args, **kwargs)

    body.forward = forward


def tile_mlps(model: torch.nn.Module, tiles: int) -> None:
    """Route every `.mlp` block through DeepSpeed's TiledMLP: its forward over `tiles` slices of the tokens without
    keeping anything but its input, the backward recomputing slice by slice (so long sequences never hold the MLP's
    intermediates whole). LoRA adapters added later are part of the recomputed forward."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    mlps = [m for name, m in model.named_modules() if name.endswith(".mlp")]
    if tiles < 1 or not mlps:
        raise ConfigError(
            f"model.tiled_mlp={tiles}: needs >= 1 and a model with `.mlp` blocks ({type(model).__name__})"
        )

    def tiled(mlp: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        own = type(mlp).forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            params = [p for p in mlp.parameters() if p.requires_grad]
            if params and torch.is_grad_enabled() and not x.requires_grad:  # (frozen below, adapters here): autograd
                x = x.detach().requires_grad_()  # sees only x as the Function's input, so make it ask for a gradient
            return TiledMLP.apply(own, mlp, x, tiles, params)

        return forward

    for mlp in mlps:
        mlp.forward = tiled(mlp)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def check_model_source(cfg: ModelConfig) -> None:
    """One source of weights: `path`, `preset` or `init_config`, where `path` may come with the `preset` it must match
    (its config.json is compared key by key; see `presets.ARCHITECTURE_KEYS`)."""
    if cfg.init_config and cfg.path is not None:
        raise ConfigError("model: set either 'path' (a pretrained model) or 'init_config' (random init), not both")
    if cfg.init_config and cfg.preset is not None:
        raise ConfigError("model: set either 'preset' (a named architecture) or 'init_config' (a dict), not both")
    if cfg.path is None and cfg.preset is None and not cfg.init_config:
        raise ConfigError(
            "model: set 'path' (a local HF model directory), 'preset' (configs/models/<name>.yaml) or 'init_config' "
            "(a model config dict)"
        )
    if cfg.path is not None and cfg.preset is not None:
        check_preset_matches(cfg.preset, local_dir(cfg.path, "model.path"))
    elif cfg.path is not None:
        local_dir(cfg.path, "model.path")


def init_model_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The transformers config a random-init model is built from: `model.preset` or `model.init_config`.

    A preset keeps its own vocabulary size (the real model's shape and memory; the real tokenizer fits it) unless the
    tokenizer is larger, and takes its special-token ids from the tokenizer that will feed it."""
    if cfg.preset is None:
        return build_config(cfg.init_config, tokenizer)
    fields = {k: v for k, v in load_preset(cfg.preset).items() if k not in SPECIAL_TOKEN_IDS}
    fields["vocab_size"] = max(fields["vocab_size"], len(tokenizer))
    return build_config(fields, tokenizer, key="model.preset")


def build_config(
    init_config: dict, tokenizer: PreTrainedTokenizerBase, key: str = "model.init_config"
) -> PretrainedConfig:
    """A transformers config from a dict with `model_type`; token ids and vocab size default to the tokenizer's."""
    defaults = {"vocab_size": len(tokenizer), **{name: getattr(tokenizer, name) for name in SPECIAL_TOKEN_IDS}}
    return hf_config({**defaults, **init_config}, key=key)


def warn_remote_code(cfg: ModelConfig, path: str, what: str) -> None:
    if cfg.trust_remote_code:
        dist.print0(
            f"warning: model.trust_remote_code is on: Python code from the {what} directory '{path}' (its auto_map) "
            "will run on every rank. Only use it for directories you trust."
        )


def make_trainable(model: torch.nn.Module, lora: LoraConfig, gradient_checkpointing: bool, name: str = "model") -> None:
    """Full fine-tuning, or LoRA adapters on `lora.target_modules` (base frozen); prints what trains on rank 0."""
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
