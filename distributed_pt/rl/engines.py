"""Rollout engines: what generates the RL stages' completions (sampled rollouts and greedy evals).

    engine = rollout_engine(cfg, actor, tokenizer)    # rollout.engine: hf | vllm
    out = engine.generate(prompts, max_new_tokens, greedy=False, temperature=1.0, top_p=1.0, seed=step_seed)

Both return each prompt's generated token ids up to and including the first EOS (every generated token when there
is none). "hf" runs transformers' `generate` on the actor itself, so it always samples the current weights. "vllm"
(distributed_pt.rl.vllm_engine) is a vLLM engine on every rank that the actor's weights are pushed into whenever the
actor has stepped since the last push; it also returns its log-prob of each token, for the off-policy correction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from distributed_pt.config import ConfigError
from distributed_pt.engine.generation import generate

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from transformers import PreTrainedTokenizerBase


@dataclass
class Completions:
    tokens: list[list[int]]  # per prompt: generated ids, up to and including the first EOS
    logprobs: list[list[float]] | None  # the engine's log-prob of each of those tokens (None: not given)
    gen_time: float  # seconds generating
    sync_time: float = 0.0  # seconds pushing weights into the engine first


class RolloutEngine(Protocol):
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        greedy: bool,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> Completions: ...


class HFEngine:
    """transformers' `generate` on the actor (ZeRO-3: gathered once per call). `seed` is unused: sampling draws from
    torch's generator, which checkpoints save and restore."""

    def __init__(self, actor: DeepSpeedEngine, tokenizer: PreTrainedTokenizerBase) -> None:
        self.actor, self.tokenizer = actor, tokenizer

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        greedy: bool,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> Completions:
        start = time.perf_counter()
        out, mask = generate(self.actor, prompts, self.tokenizer, max_new_tokens, not greedy, temperature, top_p)
        tokens = [until_eos(row, self.tokenizer.eos_token_id) for row in out[:, mask.size(1) :].tolist()]
        return Completions(tokens, None, time.perf_counter() - start)


def until_eos(tokens: list[int], eos_id: int) -> list[int]:
    """`tokens` up to and including the first `eos_id` (all of them when there is none)."""
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def rollout_engine(cfg: Any, actor: DeepSpeedEngine, tokenizer: PreTrainedTokenizerBase) -> RolloutEngine:
    """The engine `cfg.rollout.engine` names, for a PPO or GRPO config whose actor is `actor`."""
    if cfg.rollout.engine == "hf":
        return HFEngine(actor, tokenizer)
    try:
        from distributed_pt.rl.vllm_engine import VLLMEngine
    except ImportError as e:
        raise ConfigError(
            f"rollout.engine=vllm: vLLM is not installed ({e}); pip install -e '.[vllm]' (GPU) or see the README's "
            "vLLM section (CPU), or set rollout.engine=hf"
        ) from e
    return VLLMEngine(cfg, actor, tokenizer)


def seed_for(seed: int, step: int, rank: int) -> int:
    """A per-(run seed, step, rank) base seed for an engine's per-request sampling seeds (stable across resumes)."""
    return (seed * 1_000_003 + step) * 65_537 + rank * 4099 & 0x7FFFFFFF


def check_rollout_config(cfg: Any) -> None:
    """Rollout settings the typed config cannot check."""
    r = cfg.rollout
    if r.correction != "none" and r.engine != "vllm":
        raise ConfigError(f"rollout.correction={r.correction}: needs rollout.engine=vllm (hf samples the trainer's own "
                          "weights; there is nothing to correct)")  # fmt: skip
    if r.correction_cap < 1.0:
        raise ConfigError(f"rollout.correction_cap must be >= 1, got {r.correction_cap}")
    if r.engine == "vllm" and cfg.model.path is None:
        raise ConfigError("rollout.engine=vllm loads the policy from model.path (a saved model directory); set it")
    if r.tensor_parallel_size < 1:
        raise ConfigError(f"rollout.tensor_parallel_size must be >= 1, got {r.tensor_parallel_size}")
