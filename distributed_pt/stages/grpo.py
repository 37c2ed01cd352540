"""GRPO: an RL stage without a critic. Each prompt is sampled `grpo.num_generations` times; programmatic reward
functions score the completions, and each completion's advantage is its reward against its group's.

    deepspeed --num_gpus 8 --module distributed_pt.train configs/grpo_tiny.yaml [key.sub=value ...]

Models: the policy (`model.path`, an SFT output; LoRA or full) on its DeepSpeed engine, and a frozen reference only
when `grpo.beta` > 0 (with LoRA: the policy with its adapters switched off; else a frozen copy). Each step: a rollout
of `grpo.rollout_batch_size` prompts per rank × G completions, rewards from `reward.functions`, group-relative
advantages, then `grpo.num_iterations` passes of clipped-ratio updates in minibatches of `train.micro_batch_size`
completions (with one pass the rollout's log-probs are the current ones: no extra forward). Rollouts and greedy
evals come from `rollout.engine` (hf, or a colocated vLLM engine: rl/engines.py). With sequence parallelism the
ranks of a group update on all their rollouts, each on its shard of every sequence. Outputs as for SFT.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from typing import TYPE_CHECKING

import torch

from distributed_pt import dist
from distributed_pt.config import ConfigError, GRPOConfig, GRPOSection, ModelConfig
from distributed_pt.data.collate import ShardedBatches
from distributed_pt.data.io import Row
from distributed_pt.data.prompts import is_exact_match, load_prompts, prompt_and_reference
from distributed_pt.data.sft import encode_prompt
from distributed_pt.engine import sequence
from distributed_pt.engine.deepspeed import frozen_engine, initialize, stage_ds_config
from distributed_pt.engine.loop import Run, check_finite, export, fingerprint, start
from distributed_pt.engine.metrics import peak_memory_gib
from distributed_pt.losses.grpo import grpo_loss
from distributed_pt.losses.masked import masked_mean
from distributed_pt.models.heads import Backbone, use_fused_loss
from distributed_pt.models.loading import check_same_tokenizer, load_model, load_tokenizer, make_trainable
from distributed_pt.models.reward import load_reward_model, load_reward_stats
from distributed_pt.rl.engines import RolloutEngine, check_rollout_config, rollout_engine, seed_for
from distributed_pt.rl.groups import Rollout, dynamic_sample, estimate_advantages, overlong_shaped
from distributed_pt.rl.logprobs import evaluating, reference_logprobs, token_logprobs
from distributed_pt.rl.offpolicy import mismatch_metrics, truncated_is_weights
from distributed_pt.rl.rewards import RewardFunctions, load_reward_functions
from distributed_pt.rl.rollout import Samples, rollout_rewards, sample

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from transformers import PreTrainedTokenizerBase


@dataclasses.dataclass
class Policy:
    """The engine that trains, its frozen reference (None: none needed, or the LoRA adapters switched off), how
    log-probs are computed, and what scores completions (a frozen reward model and/or reward functions)."""

    actor: DeepSpeedEngine
    reference: DeepSpeedEngine | None
    fused: bool
    reward: DeepSpeedEngine | None
    rm_stats: dict[str, float]
    functions: RewardFunctions | None
    rollouts: RolloutEngine  # what samples the actor (rl.engines)

    def rewards(self, s: Samples, rows: list[dict], step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total reward (B,): the RM's normalised score plus the functions' total; and each source's values."""
        _, functions_total, per = rollout_rewards(self.reward, self.rm_stats, self.functions, s, rows, step)
        total = torch.zeros(len(s.ended), device=s.sequences.device)
        if "reward_model" in per:
            total = total + per["reward_model"]
        if functions_total is not None:
            total = total + functions_total.to(total.device)
        return total, per


def main(cfg: GRPOConfig) -> dict:
    start(cfg)
    check_config(cfg)
    grpo = cfg.grpo
    tokenizer = load_tokenizer(cfg.model)
    prompts, rows, eval_rows = load_prompts(tokenizer, cfg.data)
    dist.print0(f"prompts: {len(prompts)} train, {len(eval_rows)} eval; {grpo.num_generations} completions each")
    functions = load_reward_functions(cfg.reward.functions, cfg.reward.weights) if cfg.reward.functions else None

    model = load_model(cfg.model, tokenizer)
    make_trainable(model, cfg.lora, cfg.model.gradient_checkpointing, name="policy")
    fused = use_fused_loss(cfg.loss.fused, model)
    reference = None
    if grpo.beta > 0 and not cfg.lora.enabled:
        frozen = load_model(dataclasses.replace(cfg.model, gradient_checkpointing=False), tokenizer)
        reference = frozen_engine(Backbone(frozen), stage_ds_config(cfg), offload=False)
    dist.print0(f"reference: {reference_kind(cfg)}")
    reward, rm_stats = None, {"mean": 0.0, "std": 1.0}
    if grpo.reward_model is not None:
        check_same_tokenizer(tokenizer, grpo.reward_model, "grpo.reward_model")
        m = cfg.model
        rm = ModelConfig(path=grpo.reward_model, dtype=m.dtype, attn_implementation=m.attn_implementation,
                         trust_remote_code=m.trust_remote_code)  # fmt: skip
        reward = frozen_engine(Backbone(load_reward_model(rm, tokenizer)), stage_ds_config(cfg), offload=False)
        rm_stats = load_reward_stats(grpo.reward_model) or rm_stats

    mpu = sequence.setup(model, cfg)  # None without sequence parallelism (rollouts are generated as without)
    batches = ShardedBatches(len(prompts), grpo.rollout_batch_size, dist.rank(), dist.world_size(), cfg.train.seed)
    total_steps = cfg.train.total_steps(batches.per_epoch)
    rows_per_update = grpo.rollout_batch_size * grpo.num_generations * cfg.deepspeed.sequence_parallel_size
    updates = grpo.num_iterations * rows_per_update // cfg.train.micro_batch_size
    actor = initialize(Backbone(model), stage_ds_config(cfg), cfg.optim, total_steps * updates, mpu)
    policy = Policy(actor, reference, fused, reward, rm_stats, functions, rollout_engine(cfg, actor, tokenizer))

    run = Run(cfg, actor, total_steps, fingerprint(tokenizer, cfg.data.train_files))
    before, after = run.train(
        lambda: train(run, policy, prompts, rows, batches, tokenizer),
        lambda: evaluate(policy, eval_rows, tokenizer, cfg),
    )
    if cfg.checkpoint.export_hf:
        export(actor, tokenizer, cfg, run.out / "final")
    return run.finish(before, after)


def train(
    run: Run,
    policy: Policy,
    prompts: list[list[int]],
    rows: list[Row],
    batches: ShardedBatches,
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    grpo = run.cfg.grpo
    rollouts = batches.iterate(run.state.micro_step)

    def roll_out() -> Rollout:
        """The next batch of prompts, sampled and scored (+ DAPO's overlong shaping)."""
        run.state.micro_step, indices = next(rollouts)
        group = [i for i in indices for _ in range(grpo.num_generations)]  # each prompt G times, contiguous
        seed = seed_for(run.cfg.train.seed, run.state.micro_step, dist.rank())
        samples = sample(policy.rollouts, [prompts[i] for i in group], tokenizer, grpo.max_new_tokens,
                         grpo.temperature, grpo.top_p, seed=seed)  # fmt: skip
        total, per_source = policy.rewards(samples, [rows[i].data for i in group], run.state.step + 1)
        texts = [prompt_and_reference(rows[i].data)[0] for i in group]
        return overlong_shaped(Rollout(samples, total, per_source, texts), grpo)

    while run.training():
        batch, sampling = dynamic_sample(roll_out, grpo, tokenizer.pad_token_id) if grpo.dynamic_sampling else (
            roll_out(), {})  # fmt: skip
        start = time.perf_counter()
        stats = update(policy, batch.samples, batch.total, run.cfg, run.state.step)
        train_time = time.perf_counter() - start
        metrics = rollout_metrics(batch, grpo, stats | sampling, train_time)
        if grpo.sample_every and (run.state.step + 1) % grpo.sample_every == 0:
            batch.log_samples(run.logger, run.state.step + 1)
        run.end_step(metrics, postfix=("reward", "kl"))


def update(policy: Policy, s: Samples, total: torch.Tensor, cfg: GRPOConfig, step: int) -> dict[str, float]:
    """Advantages of the rollout, then `num_iterations` passes over it in shuffled minibatches of completions. With
    one pass the rollout's log-probs are the current ones (detached); with more, with the off-policy correction, or
    with REINFORCE++'s KL in the rewards, they are computed once before the first update. The engine-trainer
    mismatch is measured on the first minibatch, before any update."""
    grpo, actor = cfg.grpo, policy.actor
    seqs, attn, mask = s.sequences, s.attention_mask, s.action_mask
    if grpo.mask_truncated:  # DAPO's overlong filtering: completions cut at max_new_tokens teach nothing
        mask = mask * s.ended.unsqueeze(1)
    engine, correction = s.engine_logprobs, cfg.rollout.correction
    kl_in_reward = grpo.advantage_estimator.startswith("reinforce_pp")
    old = ref = offpolicy = None
    with torch.no_grad(), evaluating(actor):  # whole sequences (eval mode turns sequence parallelism off)
        if grpo.num_iterations > 1 or correction != "none" or (kl_in_reward and grpo.beta > 0):
            old = token_logprobs(actor, seqs, attn, grpo.temperature, policy.fused)[0]
        if grpo.beta > 0:
            ref = reference_logprobs(actor, policy.reference, seqs, attn, grpo.temperature, policy.fused)
    advantages = estimate_advantages(total, mask, old, ref, grpo)
    cut = sequence.Shard.of(cfg)
    if cut.sp > 1:  # every rank of a sequence-parallel group trains on the group's rollouts, each on its shard
        seqs, attn, mask, advantages, old, ref, engine = sequence.gather(seqs, attn, mask, advantages, old, ref, engine)
    token_adv = advantages.dim() == 2
    beta = 0.0 if kl_in_reward else grpo.beta
    g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)
    totals: Counter[str] = Counter()
    n = 0
    for _ in range(grpo.num_iterations):
        for rows in torch.randperm(seqs.size(0), generator=g).split(cfg.train.micro_batch_size):
            rows = rows.to(seqs.device)
            width = int(attn[rows].sum(1).max())  # trim the minibatch to its longest sequence
            inputs = cut.inputs(seqs[rows, :width], attn[rows, :width])
            logp, entropy = token_logprobs(actor, temperature=grpo.temperature, fused=policy.fused, **inputs)
            m, old_mb, ref_mb, engine_mb = (x if x is None else x[rows, : width - 1] for x in (mask, old, ref, engine))
            adv_mb = advantages[rows, : width - 1] if token_adv else advantages[rows]
            is_weights = None
            if engine_mb is not None and correction != "none":  # `old` is computed then; on whole sequences
                is_weights = truncated_is_weights(old_mb, engine_mb, m, correction, cfg.rollout.correction_cap)
            m, ref_mb, is_weights, engine_mb = cut(m), cut(ref_mb), cut(is_weights), cut(engine_mb)
            old_mb = logp.detach() if old_mb is None else cut(old_mb)
            if engine_mb is not None:  # collective: the same minibatch index on every rank
                offpolicy = offpolicy or mismatch_metrics(old_mb, engine_mb, m)
            loss, stats = grpo_loss(logp, old_mb, cut(adv_mb) if token_adv else adv_mb, m, grpo.loss_type,
                                    grpo.clip_low, grpo.clip_high, ref_mb, beta, grpo.max_new_tokens, is_weights,
                                    grpo.importance_sampling_level, cut.reduce)  # fmt: skip
            check_finite(loss, step + 1)
            actor.backward(loss / cut.sp)  # each shard's 1/SP (engine.sequence)
            actor.step()
            ent = masked_mean(entropy.detach(), m, reduce=cut.reduce)  # the whole sequences' (one all-reduce under SP)
            totals.update(stats | {"loss": loss.item(), "entropy": ent.item()})
            n += 1
    adv_stats = advantages if token_adv else advantages.unsqueeze(1).expand_as(mask)
    totals_mean = {k: v / n for k, v in totals.items()}
    with torch.no_grad():
        mean = masked_mean(adv_stats, mask)
        totals_mean["advantage_mean"] = mean.item()
        totals_mean["advantage_std"] = masked_mean((adv_stats - mean) ** 2, mask).sqrt().item()
    return totals_mean | (offpolicy or {})


def rollout_metrics(batch: Rollout, grpo: GRPOSection, stats: dict[str, float], train_time: float) -> dict[str, float]:
    """Rewards (total and per source), group spread, completion lengths, EOS, overlong share, speeds and the update's
    statistics (advantages, clipping, dynamic sampling), averaged over ranks (max length: the largest over ranks)."""
    s, total = batch.samples, batch.total
    lengths = s.action_mask.sum(1)
    group_std = total.view(-1, grpo.num_generations).std(1, unbiased=False)
    if grpo.overlong_buffer:  # completions in the penalised zone (or cut)
        stats = stats | {
            "overlong_fraction": (lengths > grpo.max_new_tokens - grpo.overlong_buffer).float().mean().item()
        }
    local = {
        "reward": total.mean().item(),
        **{f"reward/{name}": v.float().mean().item() for name, v in batch.per_source.items()},
        "reward_group_std": group_std.mean().item(),
        "zero_std_fraction": (group_std < 1e-6).float().mean().item(),
        "completion_length": lengths.float().mean().item(),
        "clipped_fraction": (~s.ended).float().mean().item(),  # hit max_new_tokens without EOS
        "eos_fraction": s.ended.float().mean().item(),
        "gen_tokens_per_s": lengths.sum().item() / max(s.gen_time, 1e-9),
        "train_tokens_per_s": s.attention_mask.sum().item() / max(train_time, 1e-9),
        "gen_time": s.gen_time,
        "sync_time": s.sync_time,
        "train_time": train_time,
        **{k: v for k, v in stats.items() if not k.startswith("offpolicy/")},  # those are reduced already
    }
    names = sorted(local)
    reduced = dist.all_reduce_sum(torch.tensor([local[k] for k in names], dtype=torch.float64)) / dist.world_size()
    metrics = dict(zip(names, reduced.tolist(), strict=True))
    metrics["completion_length_max"] = dist.all_reduce_max(lengths.max().float().reshape(1)).item()
    metrics |= {k: v for k, v in stats.items() if k.startswith("offpolicy/")}
    metrics["peak_mem_gib"] = peak_memory_gib()
    return metrics


@torch.no_grad()
def evaluate(policy: Policy, rows: list[Row], tokenizer: PreTrainedTokenizerBase, cfg: GRPOConfig) -> dict[str, float]:
    """Greedy completions of the held-out prompts: mean reward, and exact match (overall and per `task` column) over
    the rows with a reference answer. Equal shares per rank so ZeRO-3 gathers stay in step."""
    if not rows or cfg.eval.num_generate <= 0:
        return {}
    mine = dist.equal_share(rows[: cfg.eval.num_generate])
    tasks = sorted({r.data.get("task") for r in rows[: cfg.eval.num_generate]} - {None})
    sums = torch.zeros(3 + 2 * len(tasks), dtype=torch.float64)  # reward, correct, with answer, per task: both
    for i in range(0, len(mine), cfg.train.micro_batch_size):
        chunk = [r.data for r in mine[i : i + cfg.train.micro_batch_size]]
        prompts = [encode_prompt(tokenizer, prompt_and_reference(r)[0]) for r in chunk]
        greedy = sample(policy.rollouts, prompts, tokenizer, cfg.eval.max_new_tokens, greedy=True)
        total, _ = policy.rewards(greedy, chunk, step=0)
        sums[0] += total.sum().item()
        for row, text in zip(chunk, greedy.completions, strict=True):
            ref = prompt_and_reference(row)[1]
            hit, counted = float(is_exact_match(text, ref)), float(ref is not None)
            sums[1:3] += torch.tensor([hit, counted], dtype=torch.float64)
            if row.get("task") in tasks:
                k = 3 + 2 * tasks.index(row["task"])
                sums[k : k + 2] += torch.tensor([hit, counted], dtype=torch.float64)
    totals = dist.all_reduce_sum(sums).tolist()
    metrics = {"eval/reward": totals[0] / max(len(mine) * dist.world_size(), 1)}
    for name, (hit, counted) in [("", totals[1:3])] + [
        (f"/{t}", totals[3 + 2 * k : 5 + 2 * k]) for k, t in enumerate(tasks)
    ]:
        if counted:
            metrics[f"eval/exact_match{name}"] = hit / counted
    return metrics


def reference_kind(cfg: GRPOConfig) -> str:
    lora = "the policy with LoRA adapters off" if cfg.lora.enabled else "a frozen copy"
    return lora if cfg.grpo.beta > 0 else "none (grpo.beta = 0: no KL term, no reference model loaded)"


def check_config(cfg: GRPOConfig) -> None:
    """What the typed config cannot say: reward functions are set, groups have at least 2 completions, the rollout
    splits into micro batches, the overlong buffer fits, the rollout engine's settings."""
    grpo = cfg.grpo
    if not cfg.reward.functions and grpo.reward_model is None:
        raise ConfigError("reward.functions: GRPO needs reward functions (module.path:function) or grpo.reward_model")
    if grpo.num_generations < 2:
        raise ConfigError(f"grpo.num_generations must be >= 2 (a group), got {grpo.num_generations}")
    if (grpo.rollout_batch_size * grpo.num_generations) % cfg.train.micro_batch_size:
        raise ConfigError("grpo.rollout_batch_size x grpo.num_generations must be a multiple of train.micro_batch_size")
    if cfg.train.gradient_accumulation_steps != 1:
        raise ConfigError("train.gradient_accumulation_steps: GRPO steps once per minibatch; set it to 1")
    if not 0 <= grpo.overlong_buffer < grpo.max_new_tokens:
        raise ConfigError(f"grpo.overlong_buffer must be in [0, grpo.max_new_tokens = {grpo.max_new_tokens}), got "
                          f"{grpo.overlong_buffer}")  # fmt: skip
    if grpo.max_extra_rollouts < 0:
        raise ConfigError(f"grpo.max_extra_rollouts must be >= 0, got {grpo.max_extra_rollouts}")
    check_rollout_config(cfg)
