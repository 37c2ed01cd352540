"""PPO (InstructGPT-style RLHF): optimise the SFT policy against the reward model, with a per-token KL penalty to
the frozen reference.

    deepspeed --num_gpus 8 --module distributed_pt.train configs/ppo_tiny.yaml [key.sub=value ...]

Models: actor (from `model.path`, an SFT output; LoRA or full) and critic (from the reward model, its head read at
every token as a value head) train on their own DeepSpeed engines; the reward model and the reference are frozen
engines (ZeRO-3 + CPU offload with `ppo.offload_frozen`). With LoRA the reference is the actor with its adapters
switched off: no second copy. Each step: a rollout of `ppo.rollout_batch_size` prompts per rank, then
`ppo.ppo_epochs` passes over it in minibatches of `train.micro_batch_size`. Rollouts and greedy evals come from
`rollout.engine` (hf, or a colocated vLLM engine: rl/engines.py). Outputs as for SFT, plus the critic.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from distributed_pt import checkpoint, dist
from distributed_pt.config import ConfigError, ModelConfig, PPOConfig
from distributed_pt.data.collate import Batch, Examples, ShardedBatches, collate
from distributed_pt.data.io import Row
from distributed_pt.data.prompts import is_exact_match, load_prompts, prompt_and_reference
from distributed_pt.data.sft import encode_prompt, load_sft_data
from distributed_pt.engine import sequence
from distributed_pt.engine.deepspeed import frozen_engine, initialize, stage_ds_config
from distributed_pt.engine.loop import Run, check_finite, data_cache, export, fingerprint, start
from distributed_pt.losses.masked import masked_mean
from distributed_pt.losses.ppo import policy_loss, value_loss
from distributed_pt.models.heads import Backbone, lm_loss, token_scores, use_fused_loss
from distributed_pt.models.loading import check_same_tokenizer, load_model, load_tokenizer, make_trainable
from distributed_pt.models.reward import load_reward_model, load_reward_stats
from distributed_pt.rl.engines import check_rollout_config, rollout_engine
from distributed_pt.rl.kl import AdaptiveKLController, FixedKLController
from distributed_pt.rl.logprobs import token_logprobs
from distributed_pt.rl.rewards import load_reward_functions
from distributed_pt.rl.rollout import (
    Experience,
    RLModels,
    experience_metrics,
    log_samples,
    make_experience,
    sample,
    score_samples,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PtxBatches = Iterator[Batch] | None  # PPO-ptx SFT batches, or None without ptx


def main(cfg: PPOConfig) -> dict:
    start(cfg)
    ppo = cfg.ppo
    check_config(cfg)
    tokenizer = load_tokenizer(cfg.model)
    check_same_tokenizer(tokenizer, ppo.reward_model, "ppo.reward_model")
    check_same_tokenizer(tokenizer, ppo.critic_path, "ppo.critic_path")
    train_prompts, train_rows, eval_rows = load_prompts(tokenizer, cfg.data)
    dist.print0(f"prompts: {len(train_prompts)} train, {len(eval_rows)} eval")
    ptx_data = dataclasses.replace(cfg.data, train_files=ppo.ptx_files, eval_files=[])
    ptx_set = load_sft_data(tokenizer, ptx_data, 0, data_cache(cfg))[0] if ppo.ptx_coef > 0 else None

    models = build_models(cfg, tokenizer)
    mpu = sequence.setup(models.actor, cfg)  # None without sequence parallelism (rollouts are generated as without)
    batches = ShardedBatches(len(train_prompts), ppo.rollout_batch_size, dist.rank(), dist.world_size(), cfg.train.seed)
    total_steps = cfg.train.total_steps(batches.per_epoch)
    per_step = micro_batches_per_step(cfg) // cfg.train.gradient_accumulation_steps  # optimizer steps per PPO step
    actor_updates = max(actor_steps(cfg, total_steps), 1) * per_step
    models.actor = initialize(Backbone(models.actor), stage_ds_config(cfg), cfg.optim, actor_updates, mpu)
    critic_optim = dataclasses.replace(cfg.optim, lr=ppo.critic_lr)
    models.critic = initialize(Backbone(models.critic), stage_ds_config(cfg, critic_optim), critic_optim,
                               total_steps * per_step, mpu)  # fmt: skip
    models.rollouts = rollout_engine(cfg, models.actor, tokenizer)

    kl_ctl = AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon) if ppo.kl_target else None
    kl_ctl = kl_ctl or FixedKLController(ppo.kl_coef)
    engines = {"actor": models.actor, "critic": models.critic}
    inputs = fingerprint(tokenizer, cfg.data.train_files + ppo.ptx_files)
    run = Run(cfg, engines, total_steps, inputs, client_state=lambda: {"kl_ctl": kl_ctl.state_dict()})
    if run.client:
        kl_ctl.load_state_dict(run.client["kl_ctl"])
    ptx = ptx_batches(ptx_set, cfg, run.state.step, tokenizer.pad_token_id)
    before, after = run.train(
        lambda: train(run, models, train_prompts, train_rows, ptx, batches, tokenizer, kl_ctl),
        lambda: evaluate(models, eval_rows, tokenizer, cfg),
    )
    if cfg.checkpoint.export_hf:
        export(models.actor, tokenizer, cfg, run.out / "final")
        checkpoint.export_hf(models.critic, tokenizer, run.out / "critic")
    return run.finish(before, after)


def train(
    run: Run,
    models: RLModels,
    prompts: list[list[int]],
    rows: list[Row],
    ptx: PtxBatches,
    batches: ShardedBatches,
    tokenizer: PreTrainedTokenizerBase,
    kl_ctl: FixedKLController,
) -> None:
    cfg, ppo = run.cfg, run.cfg.ppo
    rollouts = batches.iterate(run.state.micro_step)
    while run.training():
        run.state.micro_step, indices = next(rollouts)
        chosen = [prompts[i] for i in indices], [rows[i].data for i in indices]
        exp, timing = make_experience(models, *chosen, tokenizer, cfg, kl_ctl.value, run.state.step + 1)
        start = time.perf_counter()
        stats = ppo_update(models, exp, cfg, run.state.step, ptx)
        metrics = experience_metrics(exp, timing, time.perf_counter() - start, stats, ppo.ppo_epochs)
        metrics["kl_coef"] = kl_ctl.value
        kl_ctl.update(metrics["kl"], n_steps=ppo.rollout_batch_size * dist.world_size())
        if ppo.sample_every and (run.state.step + 1) % ppo.sample_every == 0:
            log_samples(exp, tokenizer, run.logger, run.state.step + 1)
        run.end_step(metrics, postfix=("score", "kl"))


def micro_batches_per_step(cfg: PPOConfig) -> int:
    """Minibatches one PPO step trains on (and ptx batches it consumes): epochs x rollout / micro batch (x SP: a
    sequence-parallel group trains on all its ranks' rollouts)."""
    rows = cfg.ppo.rollout_batch_size * cfg.deepspeed.sequence_parallel_size
    return rows // cfg.train.micro_batch_size * cfg.ppo.ppo_epochs


def check_config(cfg: PPOConfig) -> None:
    """What the typed config cannot say: a reward model is set, the rollout splits into micro-batches, no negative
    warm-up."""
    ppo = cfg.ppo
    if ppo.reward_model is None and not cfg.reward.functions:
        raise ConfigError("ppo.reward_model: set it to a reward model directory (the RM stage's final/), or set "
                          "reward.functions")  # fmt: skip
    if ppo.rollout_batch_size % (cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps):
        raise ConfigError("ppo.rollout_batch_size must be a multiple of micro_batch_size x gradient_accumulation_steps")
    if ppo.critic_warmup_steps < 0:
        raise ConfigError(f"ppo.critic_warmup_steps must be >= 0, got {ppo.critic_warmup_steps}")
    check_rollout_config(cfg)


def actor_steps(cfg: PPOConfig, steps: int) -> int:
    """How many of the first `steps` PPO steps update the actor (the critic trains alone for the warm-up)."""
    return max(steps - cfg.ppo.critic_warmup_steps, 0)


def ptx_batches(ptx_set: Examples | None, cfg: PPOConfig, step: int, pad_id: int) -> PtxBatches:
    """PPO-ptx SFT batches from where the actor steps before `step` left off (None without ptx data)."""
    if ptx_set is None:
        return None
    order = ShardedBatches(len(ptx_set), cfg.train.micro_batch_size, *sequence.data_parallel(cfg), cfg.train.seed)
    indices = order.iterate(actor_steps(cfg, step) * micro_batches_per_step(cfg))
    return (collate(ptx_set.examples(idx), pad_id) for _, idx in indices)


def ppo_update(models: RLModels, exp: Experience, cfg: PPOConfig, step: int, ptx: PtxBatches) -> dict[str, float]:
    """`ppo_epochs` passes over the rollout in shuffled minibatches: clipped policy loss (- entropy bonus, + ptx)
    on the actor, clipped value loss on the critic. Returns the averaged loss statistics."""
    ppo, mbs, cut = cfg.ppo, cfg.train.micro_batch_size, sequence.Shard.of(cfg)
    if cut.sp > 1:  # every rank of a sequence-parallel group trains on the group's rollouts, each on its shard
        exp = Experience(*sequence.gather(*(getattr(exp, f.name) for f in dataclasses.fields(exp))))
    totals: Counter[str] = Counter()
    n = 0
    g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)
    train_actor = actor_steps(cfg, step + 1) > 0
    for _ in range(ppo.ppo_epochs):
        for rows in torch.randperm(exp.sequences.size(0), generator=g).split(mbs):
            mb = exp.select(rows.to(exp.sequences.device))
            row = actor_update(models, mb, cfg, step, ptx, cut) if train_actor else {}

            values = cut.scored(token_scores(models.critic, **cut.inputs(mb.sequences, mb.attention_mask, False)))
            v_loss, v_stats = value_loss(values, cut(mb.values), cut(mb.returns), cut(mb.action_mask), ppo.value_clip,
                                         cut.reduce)  # fmt: skip
            check_finite(v_loss, step + 1)
            models.critic.backward(v_loss / cut.sp)  # each shard's 1/SP (engine.sequence)
            models.critic.step()
            totals.update(row | v_stats | {"value_loss": v_loss.item()})
            n += 1
    return {k: v / n for k, v in totals.items()}


def actor_update(
    models: RLModels, mb: Experience, cfg: PPOConfig, step: int, ptx: PtxBatches, cut: sequence.Shard
) -> dict[str, float]:
    """One actor step on a minibatch (`cut`: this rank's shard of it): clipped policy loss - entropy bonus
    (+ ptx_coef * SFT loss on a ptx batch)."""
    ppo, actor, mask = cfg.ppo, models.actor, cut(mb.action_mask)
    inputs = cut.inputs(mb.sequences, mb.attention_mask)
    logprobs, entropy = token_logprobs(actor, temperature=ppo.temperature, fused=models.fused, **inputs)
    pg_loss, stats = policy_loss(logprobs, cut(mb.old_logprobs), cut(mb.advantages), mask, ppo.clip_ratio,
                                 cut(mb.is_weights), cut.reduce)  # fmt: skip
    ent = masked_mean(entropy, mask, reduce=cut.reduce)
    loss = pg_loss - ppo.entropy_coef * ent
    if ptx is not None:
        batch = next(ptx)
        batch = batch if cut.sp == 1 else sequence.shard(batch, cut.sp, cut.rank, 0)
        total = lm_loss(actor, batch.to(actor.device), models.fused, reduction="sum")
        targets = torch.tensor(float(batch.num_targets), device=total.device)
        reduce = cut.reduce or (lambda t: t)
        ptx_loss = reduce(total) / reduce(targets).clamp(min=1)
        loss = loss + ppo.ptx_coef * ptx_loss
        stats["ptx_loss"] = ptx_loss.item()
    check_finite(loss, step + 1)
    actor.backward(loss / cut.sp)  # each shard's 1/SP (engine.sequence)
    actor.step()
    return {"policy_loss": pg_loss.item(), "entropy": ent.item(), **stats}


@torch.no_grad()
def evaluate(models: RLModels, rows: list[Row], tokenizer: PreTrainedTokenizerBase, cfg: PPOConfig) -> dict[str, float]:
    """Greedy responses to held-out prompts: mean normalised RM score, and exact-match accuracy for rows with an
    answer. Equal shares per rank (a remainder under world size is left out) so ZeRO-3 gathers stay in step."""
    if not rows or cfg.eval.num_generate <= 0:
        return {}
    mbs = cfg.train.micro_batch_size
    mine = dist.equal_share(rows[: cfg.eval.num_generate])
    sums = torch.zeros(5, dtype=torch.float64)  # score, correct, with answer, length, n
    for i in range(0, len(mine), mbs):
        chunk = [prompt_and_reference(r.data) for r in mine[i : i + mbs]]
        prompts = [encode_prompt(tokenizer, prompt) for prompt, _ in chunk]
        greedy = sample(models.rollouts, prompts, tokenizer, cfg.eval.max_new_tokens, greedy=True)
        scores, _ = score_samples(models, greedy, [r.data for r in mine[i : i + mbs]], cfg.ppo, step=0)
        correct = sum(is_exact_match(t, ref) for t, (_, ref) in zip(greedy.completions, chunk, strict=True))
        with_answer = sum(ref is not None for _, ref in chunk)
        length = greedy.action_mask.sum().item()
        sums += torch.tensor([scores.sum().item(), correct, with_answer, length, len(chunk)], dtype=torch.float64)
    score, correct, with_answer, length, n = dist.all_reduce_sum(sums).tolist()
    metrics = {"eval/score": score / max(n, 1), "eval/response_length": length / max(n, 1)}
    if with_answer:
        metrics["eval/exact_match"] = correct / with_answer
    return metrics


def build_models(cfg: PPOConfig, tokenizer: PreTrainedTokenizerBase) -> RLModels:
    """Actor (+ LoRA), critic (from the reward model), frozen reward model and reference, and the RM score stats."""
    ppo = cfg.ppo
    actor = load_model(cfg.model, tokenizer)
    make_trainable(actor, cfg.lora, cfg.model.gradient_checkpointing, name="actor")
    fused = use_fused_loss(cfg.loss.fused, actor)
    reference = None
    if not cfg.lora.enabled:
        reference = load_model(dataclasses.replace(cfg.model, gradient_checkpointing=False), tokenizer)
    dist.print0(f"reference: {'the actor with LoRA adapters off' if reference is None else 'a frozen copy'}")
    rm_cfg = ModelConfig(
        path=ppo.reward_model, dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
    )  # fmt: skip
    critic_cfg = dataclasses.replace(  # without an RM the critic starts from the actor's weights, a fresh head
        rm_cfg, path=ppo.critic_path or ppo.reward_model or cfg.model.path,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
    )  # fmt: skip
    critic = load_reward_model(critic_cfg, tokenizer)
    reward = load_reward_model(rm_cfg, tokenizer) if ppo.reward_model else None
    rm_stats = (load_reward_stats(ppo.reward_model) if reward is not None else None) or {"mean": 0.0, "std": 1.0}
    if reward is not None and load_reward_stats(ppo.reward_model) is None:
        dist.print0(f"warning: {ppo.reward_model} has no reward stats; RM scores are used unnormalised")
    if ppo.critic_path is None and reward is not None:
        # The critic starts as the RM: rescale its head so values come out on the normalised score's scale, and its
        # first estimates are a sensible baseline rather than noise that swamps the advantages.
        with torch.no_grad():
            critic.score.weight.div_(max(rm_stats["std"], 1e-6))
            if critic.score.bias is not None:
                critic.score.bias.sub_(rm_stats["mean"]).div_(max(rm_stats["std"], 1e-6))
    ds_config, offload = stage_ds_config(cfg), ppo.offload_frozen
    reward = frozen_engine(Backbone(reward), ds_config, offload) if reward is not None else None
    reference = frozen_engine(Backbone(reference), ds_config, offload) if reference is not None else None
    functions = load_reward_functions(cfg.reward.functions, cfg.reward.weights) if cfg.reward.functions else None
    return RLModels(actor, critic, reward, reference, fused, rm_stats, functions)  # actor, critic: engines later
