"""PPO rollouts: sample responses, then score them with the actor, reference, critic and reward model.

Sequences are re-packed right-padded after generation (prompt tokens, then response tokens up to and including the
first EOS), so every later forward pass uses the same positions generation used. Per-token tensors live in
"action space": index t scores token t+1, shape (B, L-1); `action_mask` is 1 on response tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from distributed_pt import dist
from distributed_pt.data.prompts import prompt_and_reference
from distributed_pt.engine.metrics import peak_memory_gib
from distributed_pt.losses.kl import kl_estimate
from distributed_pt.losses.ppo import explained_variance
from distributed_pt.models.heads import sequence_rewards, token_scores
from distributed_pt.rl.advantages import gae, masked_whiten
from distributed_pt.rl.engines import seed_for
from distributed_pt.rl.logprobs import reference_logprobs, token_logprobs
from distributed_pt.rl.offpolicy import mismatch_metrics, truncated_is_weights
from distributed_pt.rl.rewards import RewardFunctions

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from transformers import PreTrainedTokenizerBase

    from distributed_pt.rl.engines import RolloutEngine


@dataclass
class RLModels:
    """The engines an RL step uses: actor and critic train; reward model and reference are frozen. `reference`
    None: the LoRA actor with its adapters off. `fused`: log-probs from the LM-head kernel; `rm_stats`: the RM's
    eval score mean/std that scores are normalised with."""

    actor: DeepSpeedEngine
    critic: DeepSpeedEngine
    reward: DeepSpeedEngine | None  # None: reward functions alone
    reference: DeepSpeedEngine | None
    fused: bool
    rm_stats: dict[str, float]
    functions: RewardFunctions | None = None  # programmatic rewards added to the RM's score
    rollouts: RolloutEngine | None = None  # what samples the actor (rl.engines; set once the actor is an engine)


@dataclass
class Experience:
    sequences: torch.Tensor  # (B, L) right-padded prompt + response
    attention_mask: torch.Tensor  # (B, L)
    action_mask: torch.Tensor  # (B, L-1) 1 where the next token is a response token
    old_logprobs: torch.Tensor  # (B, L-1) actor at rollout time
    ref_logprobs: torch.Tensor  # (B, L-1)
    values: torch.Tensor  # (B, L-1) critic at rollout time
    rewards: torch.Tensor  # (B, L-1) -beta * KL per token, + score at the last response token
    advantages: torch.Tensor  # (B, L-1)
    returns: torch.Tensor  # (B, L-1)
    scores: torch.Tensor  # (B,) normalised, penalised, clipped RM score
    raw_scores: torch.Tensor  # (B,) RM output
    ended: torch.Tensor  # (B,) bool: the response ended with EOS
    is_weights: torch.Tensor  # (B, L-1) off-policy correction of the policy loss (ones without one)

    def select(self, rows: torch.Tensor) -> Experience:
        """A minibatch of rows, trimmed to its longest sequence."""
        width, full = int(self.attention_mask[rows].sum(1).max()), self.sequences.size(1)

        def cut(t: torch.Tensor) -> torch.Tensor:
            t = t[rows]
            return t[:, : width - (full - t.size(1))] if t.dim() == 2 else t

        return Experience(**{f.name: cut(getattr(self, f.name)) for f in fields(self)})


def pack(
    prompts: list[list[int]],
    completions: list[list[int]],
    eos_id: int,
    pad_id: int,
    logprobs: list[list[float]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Prompt + completion token ids → right-padded (sequences, attention_mask, action_mask, ended, logprobs): a
    completion's per-token `logprobs` (an engine's) land in action space like `action_mask`, else None."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    seqs = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(seqs)
    action_mask = torch.zeros((len(prompts), width - 1), dtype=torch.float32)
    packed_logprobs = None if logprobs is None else torch.zeros_like(action_mask)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        n = len(p) + len(c)
        seqs[i, :n] = torch.tensor(p + c)
        attn[i, :n] = 1
        action_mask[i, len(p) - 1 : n - 1] = 1
        if packed_logprobs is not None:
            packed_logprobs[i, len(p) - 1 : n - 1] = torch.tensor(logprobs[i], dtype=torch.float32)
    ended = torch.tensor([bool(c) and c[-1] == eos_id for c in completions])
    return seqs, attn, action_mask, ended, packed_logprobs


def normalised_scores(
    raw: torch.Tensor, ended: torch.Tensor, stats: dict[str, float], ppo: Any, extra: torch.Tensor | None = None
) -> torch.Tensor:
    """(raw - RM eval mean) / std (+ `extra`, the reward functions' total), + no-EOS penalty, clipped to
    +-reward_clip."""
    score = (raw.float() - stats["mean"]) / max(stats["std"], 1e-6)
    if extra is not None:
        score = score + extra.to(score.device)
    score = score + (~ended).float() * ppo.no_eos_penalty
    return score.clamp(-ppo.reward_clip, ppo.reward_clip)


def rollout_rewards(
    reward: DeepSpeedEngine | None,
    rm_stats: dict[str, float],
    functions: RewardFunctions | None,
    s: Samples,
    rows: list[dict],
    step: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """What the rewards of sampled completions are made of (collective: every rank calls it): the reward model's
    raw score at the last token (zeros without one) and its stats, the functions' weighted total (None without
    functions) and each source's values {"reward_model" (normalised), function name: ...}.

    Returns (raw RM score (B,), functions' total (B,) or None, per-source values); see `normalised_scores`.
    """
    per: dict[str, torch.Tensor] = {}
    raw = torch.zeros(len(s.ended), device=s.sequences.device)
    if reward is not None:
        raw = sequence_rewards(reward, s.sequences, s.attention_mask)
        per["reward_model"] = (raw.float() - rm_stats["mean"]) / max(rm_stats["std"], 1e-6)
    total = None
    if functions is not None:
        prompts = [prompt_and_reference(r)[0] for r in rows]
        total, per_function = functions(prompts, s.completions, rows, step)
        per |= per_function
    return raw, total, per


def score_samples(
    models: RLModels, s: Samples, rows: list[dict], ppo: Any, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's (score, raw RM output): the RM's normalised score and/or the reward functions' total, + no-EOS penalty,
    clipped (collective)."""
    raw, functions_total, _ = rollout_rewards(models.reward, models.rm_stats, models.functions, s, rows, step)
    stats = models.rm_stats if models.reward is not None else {"mean": 0.0, "std": 1.0}
    return normalised_scores(raw, s.ended, stats, ppo, functions_total), raw


@dataclass
class Samples:
    """Sampled completions, packed right-padded (see `pack`)."""

    sequences: torch.Tensor  # (B, L) prompt + completion
    attention_mask: torch.Tensor  # (B, L)
    action_mask: torch.Tensor  # (B, L-1) 1 where the next token is a completion token
    ended: torch.Tensor  # (B,) bool: the completion ended with EOS
    completions: list[str]  # decoded completions (special tokens skipped)
    gen_time: float  # seconds spent generating
    engine_logprobs: torch.Tensor | None = None  # (B, L-1) the rollout engine's log-probs (vLLM), else None
    sync_time: float = 0.0  # seconds pushing the actor's weights into the engine before generating


def take(s: Samples, rows: list[int]) -> Samples:
    """The samples at `rows`, in that order (widths kept)."""
    idx = torch.tensor(rows, dtype=torch.long, device=s.sequences.device)
    logprobs = None if s.engine_logprobs is None else s.engine_logprobs[idx]
    return Samples(s.sequences[idx], s.attention_mask[idx], s.action_mask[idx], s.ended[idx],
                   [s.completions[i] for i in rows], s.gen_time, logprobs, s.sync_time)  # fmt: skip


def cat(parts: list[Samples], pad_id: int) -> Samples:
    """Samples of several rollouts as one batch, right-padded to the widest; their times added."""
    width = max(p.sequences.size(1) for p in parts)

    def joined(name: str, value: float = 0.0) -> torch.Tensor:
        return torch.cat([F.pad(getattr(p, name), (0, width - p.sequences.size(1)), value=value) for p in parts])

    logprobs = None if any(p.engine_logprobs is None for p in parts) else joined("engine_logprobs")
    return Samples(joined("sequences", pad_id), joined("attention_mask"), joined("action_mask"),
                   torch.cat([p.ended for p in parts]), [c for p in parts for c in p.completions],
                   sum(p.gen_time for p in parts), logprobs, sum(p.sync_time for p in parts))  # fmt: skip


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025): 0 up to max_new_tokens - buffer tokens, then falling
    linearly to -penalty at max_new_tokens (a completion cut there gets -penalty)."""
    start = max_new_tokens - buffer
    return -penalty * ((lengths.float() - start).clamp(min=0) / buffer).clamp(max=1.0)


@torch.no_grad()
def sample(
    engine: RolloutEngine,
    prompts: list[list[int]],
    tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    seed: int = 0,
) -> Samples:
    """Sample (or, `greedy`, decode greedily) one completion per prompt (token ids; repeat a prompt for a group)
    with the rollout engine (`seed`: the base of its per-request seeds, where it takes them)."""
    out = engine.generate(prompts, max_new_tokens, greedy, temperature, top_p, seed)
    seqs, attn, action_mask, ended, logprobs = pack(
        prompts, out.tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, out.logprobs
    )
    texts = tokenizer.batch_decode(out.tokens, skip_special_tokens=True)
    device = dist.device()
    logprobs = None if logprobs is None else logprobs.to(device)
    return Samples(seqs.to(device), attn.to(device), action_mask.to(device), ended.to(device), texts, out.gen_time,
                   logprobs, out.sync_time)  # fmt: skip


@torch.no_grad()
def make_experience(
    models: RLModels,
    prompts: list[list[int]],
    rows: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    cfg: Any,
    kl_coef: float,
    step: int,
) -> tuple[Experience, dict[str, float]]:
    """Generate from `prompts` (token ids; `rows`: their dataset rows, for reward functions) and score everything
    with `models`. Returns (Experience, timings and the engine's off-policy metrics)."""
    ppo = cfg.ppo
    samples = sample(models.rollouts, prompts, tokenizer, ppo.max_new_tokens, ppo.temperature, ppo.top_p,
                     seed=seed_for(cfg.train.seed, step, dist.rank()))  # fmt: skip
    seqs, attn, action_mask, ended = samples.sequences, samples.attention_mask, samples.action_mask, samples.ended

    start = time.perf_counter()
    for engine in (models.actor, models.critic):
        engine.eval()
    old_logprobs, _ = token_logprobs(models.actor, seqs, attn, ppo.temperature, models.fused)
    ref_logprobs = reference_logprobs(models.actor, models.reference, seqs, attn, ppo.temperature, models.fused)
    values = token_scores(models.critic, seqs, attn)[:, :-1] * action_mask
    scores, raw = score_samples(models, samples, rows, ppo, step)

    is_weights, offpolicy = torch.ones_like(old_logprobs), {}
    if samples.engine_logprobs is not None:
        offpolicy = mismatch_metrics(old_logprobs, samples.engine_logprobs, action_mask)
        if cfg.rollout.correction != "none":
            is_weights = truncated_is_weights(old_logprobs, samples.engine_logprobs, action_mask,
                                              cfg.rollout.correction, cfg.rollout.correction_cap)  # fmt: skip

    kl = kl_estimate(old_logprobs, ref_logprobs, ppo.kl_estimator) * action_mask
    rewards = -kl_coef * kl
    last = (action_mask * torch.arange(action_mask.size(1), device=seqs.device)).argmax(1)
    rewards[torch.arange(len(last)), last] += scores
    advantages, returns = gae(rewards, values, action_mask, ppo.gamma, ppo.lam)
    if ppo.whiten_advantages:
        advantages = masked_whiten(advantages, action_mask)
    for engine in (models.actor, models.critic):
        engine.train()
    score_time = time.perf_counter() - start
    exp = Experience(seqs, attn, action_mask, old_logprobs, ref_logprobs, values, rewards, advantages, returns,
                     scores, raw, ended, is_weights)  # fmt: skip
    return exp, {"gen_time": samples.gen_time, "sync_time": samples.sync_time, "score_time": score_time, **offpolicy}


def log_samples(exp: Experience, tokenizer: PreTrainedTokenizerBase, logger: Any, step: int, n: int = 4) -> None:
    """A W&B table of the first `n` rollouts (prompt, response, score); the first one printed on rank 0."""
    rows = []
    for i in range(min(n, exp.sequences.size(0))):
        ids = exp.sequences[i][exp.attention_mask[i].bool()]
        start = int(exp.action_mask[i].argmax()) + 1
        prompt, response = (tokenizer.decode(t, skip_special_tokens=True) for t in (ids[:start], ids[start:]))
        rows.append([prompt, response, exp.scores[i].item()])
    logger.log_table("samples", ["prompt", "response", "score"], rows, step=step)
    dist.print0(f"sample @ {step}: {rows[0][0]!r} -> {rows[0][1]!r} (score {rows[0][2]:.2f})")


def experience_metrics(
    exp: Experience,
    timing: dict[str, float],
    train_time: float,
    stats: dict[str, float],
    epochs: int,
) -> dict[str, float]:
    """PPO's rollout statistics averaged over ranks (score, reward, KL, lengths, EOS, speeds) and the update's losses
    (`stats`)."""
    mask = exp.action_mask
    resp_len = mask.sum(1)
    kl_per_seq = ((exp.old_logprobs - exp.ref_logprobs) * mask).sum(1)
    local = {
        "score": exp.scores.mean().item(),
        "score_std": exp.scores.std(unbiased=False).item(),
        "raw_score": exp.raw_scores.float().mean().item(),
        "reward": exp.rewards.sum(1).mean().item(),
        "reward_std": exp.rewards.sum(1).std(unbiased=False).item(),
        "kl": kl_per_seq.mean().item(),
        "response_length": resp_len.float().mean().item(),
        "eos_fraction": exp.ended.float().mean().item(),
        "explained_variance": explained_variance(exp.values, exp.returns, mask),
        "gen_tokens_per_s": resp_len.sum().item() / max(timing["gen_time"], 1e-9),
        "train_tokens_per_s": exp.attention_mask.sum().item() * epochs / max(train_time, 1e-9),
        "gen_time": timing["gen_time"],
        "sync_time": timing["sync_time"],
        "train_time": train_time,
        **stats,
    }
    names = sorted(local)
    reduced = dist.all_reduce_sum(torch.tensor([local[k] for k in names], dtype=torch.float64)) / dist.world_size()
    metrics = dict(zip(names, reduced.tolist(), strict=True))
    metrics |= {k: v for k, v in timing.items() if k.startswith("offpolicy/")}  # reduced already
    metrics["peak_mem_gib"] = peak_memory_gib()
    return metrics
