"""PPO (InstructGPT-style RLHF): optimise the SFT policy against the reward model, with a per-token KL penalty to
the frozen reference.

    deepspeed --num_gpus 8 --module distributed_pt.train configs/ppo_tiny.yaml [key.sub=value ...]

Models: actor (from `model.path`, an SFT output; LoRA or full) and critic (from the reward model, its head read at
every token as a value head) train on their own DeepSpeed engines; the reward model and the reference are frozen
engines (ZeRO-3 + CPU offload with `ppo.offload_frozen`). With LoRA the reference is the actor with its adapters
switched off: no second copy. Each step: a rollout of `ppo.rollout_batch_size` prompts per rank, then
`ppo.ppo_epochs` passes over it in minibatches of `train.micro_batch_size`. Outputs as for SFT, plus the critic.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm.auto import tqdm

from distributed_pt import checkpoint
from distributed_pt.config import ConfigError, ModelConfig, PPOConfig, to_dict
from distributed_pt.data.collate import ShardedBatches, collate
from distributed_pt.data.io import DataError, read_rows
from distributed_pt.data.sft import encode_prompt, load_sft_data
from distributed_pt.engine import dist
from distributed_pt.engine.deepspeed import build_ds_config, initialize
from distributed_pt.engine.generation import generate, normalize, prompt_and_reference
from distributed_pt.engine.loop import (
    State,
    TrainingError,
    check_finite,
    exit_early,
    export,
    fingerprint,
    finish,
    resume,
    save,
    should_stop,
    start,
)
from distributed_pt.engine.metrics import peak_memory_gib
from distributed_pt.logging import RunLogger
from distributed_pt.losses.ppo import explained_variance, policy_loss, value_loss
from distributed_pt.losses.sft import causal_lm_loss
from distributed_pt.models.fused_loss import enable_fused_loss, token_logprobs, use_fused_loss
from distributed_pt.models.loading import load_model, load_tokenizer
from distributed_pt.models.lora import apply_lora, count_trainable, prepare_for_gradient_checkpointing
from distributed_pt.models.reward import load_reward_model, sequence_rewards
from distributed_pt.rl.advantages import masked_mean
from distributed_pt.rl.kl import AdaptiveKLController, FixedKLController
from distributed_pt.rl.rollout import make_experience, normalised_scores, repack


def main(cfg: PPOConfig) -> dict:
    out = start(cfg)
    ppo = cfg.ppo
    check_config(cfg)

    tokenizer = load_tokenizer(cfg.model)
    check_tokenizers_agree(tokenizer, cfg)
    train_prompts, eval_rows = load_prompts(tokenizer, cfg)
    dist.print0(f"prompts: {len(train_prompts)} train, {len(eval_rows)} eval")
    ptx_set = (
        load_sft_data(tokenizer, dataclasses.replace(cfg.data, train_files=ppo.ptx_files, eval_files=[]), 0)[0]
        if ppo.ptx_coef > 0
        else []
    )

    models = build_models(cfg, tokenizer)
    batches = ShardedBatches(len(train_prompts), ppo.rollout_batch_size, dist.rank(), dist.world_size(), cfg.train.seed)
    total_steps = cfg.train.max_steps or max(1, cfg.train.epochs * batches.per_epoch)
    per_step = micro_batches_per_step(cfg) // cfg.train.gradient_accumulation_steps  # optimizer steps per PPO step
    n_updates = total_steps * per_step
    ds_config = build_ds_config(cfg.deepspeed, cfg.train, cfg.optim, cfg.model.dtype, dist.world_size())
    models.actor = initialize(models.actor, ds_config, cfg.optim, max(actor_steps(cfg, total_steps), 1) * per_step)
    critic_optim = dataclasses.replace(cfg.optim, lr=ppo.critic_lr)
    critic_config = build_ds_config(cfg.deepspeed, cfg.train, critic_optim, cfg.model.dtype, dist.world_size())
    models.critic = initialize(models.critic, critic_config, critic_optim, n_updates)
    engines = {"actor": models.actor, "critic": models.critic}

    kl_ctl = (
        AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon)
        if ppo.kl_target
        else FixedKLController(ppo.kl_coef)
    )
    state = State()
    client = resume(engines, cfg, state, fingerprint(tokenizer, cfg.data.train_files + ppo.ptx_files))
    if client:
        kl_ctl.load_state_dict(client["kl_ctl"])
    logger = RunLogger(cfg.logging, cfg.output_dir, to_dict(cfg), resume_step=state.step)
    state.install_sigterm()

    first_eval = evaluate(models, eval_rows, tokenizer, cfg) if state.step == 0 else {}
    if first_eval:
        logger.log(first_eval, step=0)
    try:
        train(
            models,
            engines,
            cfg,
            train_prompts,
            ptx_set,
            batches,
            eval_rows,
            tokenizer,
            logger,
            state,
            kl_ctl,
            total_steps,
        )
    except TrainingError as e:
        exit_early(logger, state, e)
    if should_stop(state):  # SIGTERM during training or just after it: checkpoint, exit 143
        save(engines, cfg, state, kl_ctl=kl_ctl.state_dict())
        exit_early(logger, state)

    final_eval = evaluate(models, eval_rows, tokenizer, cfg)
    logger.log(final_eval, step=state.step)
    save(engines, cfg, state, kl_ctl=kl_ctl.state_dict())
    if cfg.checkpoint.export_hf:
        export(models.actor, tokenizer, cfg, out / "final")
        checkpoint.export_hf(models.critic, tokenizer, out / "critic")
    return finish(cfg, logger, state, first_eval, final_eval)


def train(models, engines, cfg, prompts, ptx_set, batches, eval_rows, tokenizer, logger, state, kl_ctl, total_steps):
    ppo = cfg.ppo
    rollouts = batches.iterate(state.micro_step)
    ptx_batches = (
        ShardedBatches(
            len(ptx_set), cfg.train.micro_batch_size, dist.rank(), dist.world_size(), cfg.train.seed
        ).iterate(actor_steps(cfg, state.step) * micro_batches_per_step(cfg))
        if ptx_set
        else None
    )
    bar = tqdm(total=total_steps, initial=state.step, disable=not (dist.is_main() and cfg.logging.progress_bar))
    while state.step < total_steps:
        state.micro_step, indices = next(rollouts)
        exp, timing = make_experience(
            models, [prompts[i] for i in indices], tokenizer, cfg, kl_ctl.value, models.rm_stats
        )
        start = time.perf_counter()
        stats = ppo_update(models, exp, cfg, state.step, ptx_set, ptx_batches, tokenizer)
        train_time = time.perf_counter() - start
        state.step += 1
        state.micro_step += 1
        metrics = rollout_metrics(exp, timing, train_time, stats, kl_ctl, ppo.ppo_epochs)
        kl_ctl.update(metrics["kl"], n_steps=ppo.rollout_batch_size * dist.world_size())
        bar.update(1)
        bar.set_postfix(score=f"{metrics['score']:.3f}", kl=f"{metrics['kl']:.3f}")
        if state.step % cfg.train.log_every == 0 or state.step == total_steps:
            logger.log(metrics, step=state.step, console=not cfg.logging.progress_bar)
        if ppo.sample_every and state.step % ppo.sample_every == 0:
            log_samples(exp, tokenizer, logger, state.step)
        if cfg.train.eval_every and state.step % cfg.train.eval_every == 0 and state.step < total_steps:
            logger.log(evaluate(models, eval_rows, tokenizer, cfg), step=state.step)
        if cfg.checkpoint.save_every and state.step % cfg.checkpoint.save_every == 0:
            save(engines, cfg, state, kl_ctl=kl_ctl.state_dict())
        if should_stop(state):
            break
    bar.close()


def micro_batches_per_step(cfg: PPOConfig) -> int:
    """Minibatches one PPO step trains on (and ptx batches it consumes): epochs x rollout / micro batch."""
    return cfg.ppo.rollout_batch_size // cfg.train.micro_batch_size * cfg.ppo.ppo_epochs


def check_config(cfg: PPOConfig) -> None:
    """What the typed config cannot say: a reward model is set, the rollout splits into micro-batches, no negative
    warm-up."""
    ppo = cfg.ppo
    if ppo.reward_model is None:
        raise ConfigError("ppo.reward_model: set it to a reward model directory (the RM stage's final/)")
    if ppo.rollout_batch_size % (cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps):
        raise ConfigError("ppo.rollout_batch_size must be a multiple of micro_batch_size x gradient_accumulation_steps")
    if ppo.critic_warmup_steps < 0:
        raise ConfigError(f"ppo.critic_warmup_steps must be >= 0, got {ppo.critic_warmup_steps}")


def actor_steps(cfg: PPOConfig, steps: int) -> int:
    """How many of the first `steps` PPO steps update the actor (the critic trains alone for the warm-up)."""
    return max(steps - cfg.ppo.critic_warmup_steps, 0)


def ppo_update(models, exp, cfg, step: int, ptx_set, ptx_batches, tokenizer) -> dict[str, float]:
    """`ppo_epochs` passes over the rollout in shuffled minibatches: clipped policy loss (- entropy bonus, + ptx)
    on the actor, clipped value loss on the critic. Returns the averaged loss statistics."""
    ppo, mbs = cfg.ppo, cfg.train.micro_batch_size
    totals: dict[str, float] = {}
    n = 0
    g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)
    train_actor = actor_steps(cfg, step + 1) > 0
    for _ in range(ppo.ppo_epochs):
        for rows in torch.randperm(exp.sequences.size(0), generator=g).split(mbs):
            mb = exp.select(rows.to(exp.sequences.device))
            row = actor_update(models, mb, cfg, step, ptx_set, ptx_batches, tokenizer) if train_actor else {}

            values = models.critic(input_ids=mb.sequences, attention_mask=mb.attention_mask, token_scores=True)[:, :-1]
            v_loss, v_stats = value_loss(values, mb.values, mb.returns, mb.action_mask, ppo.value_clip)
            check_finite(v_loss, step + 1)
            models.critic.backward(v_loss)
            models.critic.step()
            row.update(value_loss=v_loss.item(), **v_stats)
            for k, v in row.items():
                totals[k] = totals.get(k, 0.0) + v
            n += 1
    return {k: v / n for k, v in totals.items()}


def actor_update(models, mb, cfg, step: int, ptx_set, ptx_batches, tokenizer) -> dict[str, float]:
    """One actor step on a minibatch: clipped policy loss - entropy bonus (+ ptx_coef * SFT loss on a ptx batch)."""
    ppo = cfg.ppo
    logprobs, entropy = token_logprobs(models.actor, mb.sequences, mb.attention_mask, ppo.temperature)
    pg_loss, stats = policy_loss(logprobs, mb.old_logprobs, mb.advantages, mb.action_mask, ppo.clip_ratio)
    ent = masked_mean(entropy, mb.action_mask)
    loss = pg_loss - ppo.entropy_coef * ent
    if ptx_batches is not None:
        _, idx = next(ptx_batches)
        batch = collate([ptx_set[i] for i in idx], tokenizer.pad_token_id).to(models.actor.device)
        ptx = causal_lm_loss(models.actor, batch.input_ids, batch.attention_mask, batch.labels, models.fused)
        loss = loss + ppo.ptx_coef * ptx
        stats["ptx_loss"] = ptx.item()
    check_finite(loss, step + 1)
    models.actor.backward(loss)
    models.actor.step()
    return {"policy_loss": pg_loss.item(), "entropy": ent.item(), **stats}


def rollout_metrics(exp, timing, train_time, stats, kl_ctl, epochs) -> dict[str, float]:
    """Rollout statistics averaged over ranks (score, reward, KL, lengths, EOS, speeds) and the update's losses."""
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
        "train_time": train_time,
        **stats,
    }
    names = sorted(local)
    reduced = dist.all_reduce_sum(torch.tensor([local[k] for k in names], dtype=torch.float64)) / dist.world_size()
    metrics = dict(zip(names, reduced.tolist(), strict=True))
    metrics["kl_coef"] = kl_ctl.value
    metrics["peak_mem_gib"] = peak_memory_gib()
    return metrics


@torch.no_grad()
def evaluate(models, rows, tokenizer, cfg: PPOConfig) -> dict[str, float]:
    """Greedy responses to held-out prompts: mean normalised RM score, and exact-match accuracy for rows with an
    answer. Equal shares per rank (a remainder under world size is left out) so ZeRO-3 gathers stay in step."""
    if not rows or cfg.eval.num_generate <= 0:
        return {}
    mbs = cfg.train.micro_batch_size
    rows = rows[: cfg.eval.num_generate]
    mine = dist.equal_share(rows)
    sums = torch.zeros(5, dtype=torch.float64)  # score, correct, with answer, length, n
    for i in range(0, len(mine), mbs):
        chunk = [r.data for r in mine[i : i + mbs]]
        prompts = [encode_prompt(tokenizer, prompt_and_reference(r)[0]) for r in chunk]
        out, prompt_mask = generate(models.actor, prompts, tokenizer, cfg.eval.max_new_tokens, sample=False)
        seqs, attn, action_mask, ended = repack(out, prompt_mask, tokenizer.eos_token_id, tokenizer.pad_token_id)
        scores = normalised_scores(sequence_rewards(models.reward, seqs, attn), ended, models.rm_stats, cfg.ppo)
        texts = tokenizer.batch_decode(out[:, prompt_mask.size(1) :], skip_special_tokens=True)
        refs = [prompt_and_reference(r)[1] for r in chunk]
        correct = sum(ref is not None and normalize(t) == normalize(ref) for t, ref in zip(texts, refs, strict=True))
        with_answer = sum(ref is not None for ref in refs)
        sums += torch.tensor(
            [scores.sum().item(), correct, with_answer, action_mask.sum().item(), len(chunk)], dtype=torch.float64
        )
    score, correct, with_answer, length, n = dist.all_reduce_sum(sums).tolist()
    metrics = {"eval/score": score / max(n, 1), "eval/response_length": length / max(n, 1)}
    if with_answer:
        metrics["eval/exact_match"] = correct / with_answer
    return metrics


def build_models(cfg: PPOConfig, tokenizer) -> SimpleNamespace:
    """Actor (+ LoRA), critic (from the reward model), frozen reward model and reference, and the RM score stats."""
    ppo = cfg.ppo
    actor = load_model(cfg.model, tokenizer)
    fused = use_fused_loss(cfg.loss.fused) and enable_fused_loss(actor)
    reference = None
    if cfg.lora.enabled:
        apply_lora(actor, cfg.lora)
        if cfg.model.gradient_checkpointing:
            prepare_for_gradient_checkpointing(actor)
    else:
        reference = load_model(dataclasses.replace(cfg.model, gradient_checkpointing=False), tokenizer)
        if fused:
            enable_fused_loss(reference)
    trainable, total = count_trainable(actor)
    ref_kind = "the actor with LoRA adapters off" if reference is None else "a frozen copy"
    dist.print0(f"actor: {trainable:,} trainable of {total:,} parameters; reference: {ref_kind}")
    rm_cfg = ModelConfig(
        path=ppo.reward_model, dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation
    )
    critic_cfg = dataclasses.replace(
        rm_cfg, path=ppo.critic_path or ppo.reward_model, gradient_checkpointing=cfg.model.gradient_checkpointing
    )
    critic = load_reward_model(critic_cfg, tokenizer)
    reward = load_reward_model(rm_cfg, tokenizer)
    stats_file = Path(ppo.reward_model) / "reward_stats.json"
    rm_stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {"mean": 0.0, "std": 1.0}
    if not stats_file.is_file():
        dist.print0(f"warning: no {stats_file}; RM scores are used unnormalised")
    if ppo.critic_path is None:
        # The critic starts as the RM: rescale its head so values come out on the normalised score's scale, and its
        # first estimates are a sensible baseline rather than noise that swamps the advantages.
        with torch.no_grad():
            critic.score.weight.div_(max(rm_stats["std"], 1e-6))
            if critic.score.bias is not None:
                critic.score.bias.sub_(rm_stats["mean"]).div_(max(rm_stats["std"], 1e-6))
    return SimpleNamespace(
        actor=actor, critic=critic, reward=frozen_engine(reward, cfg), fused=fused, rm_stats=rm_stats,
        reference=frozen_engine(reference, cfg) if reference is not None else None,
    )  # fmt: skip


def frozen_engine(model, cfg: PPOConfig):
    """A DeepSpeed engine without optimizer for a frozen model: ZeRO-3 (partitioned, optionally CPU-offloaded) when
    training runs ZeRO-3 or `ppo.offload_frozen` is set, else a plain replica."""
    import deepspeed

    model.requires_grad_(False)
    ds = build_ds_config(cfg.deepspeed, cfg.train, cfg.optim, cfg.model.dtype, dist.world_size())
    stage3 = ds["zero_optimization"].get("stage", 0) == 3 or cfg.ppo.offload_frozen
    zero = {"stage": 3 if stage3 else 0}
    if cfg.ppo.offload_frozen:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    conf = {
        k: ds[k]
        for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "bf16", "fp16")
    }
    engine, *_ = deepspeed.initialize(model=model, config={**conf, "zero_optimization": zero})
    engine.eval()
    return engine


def load_prompts(tokenizer, cfg: PPOConfig):
    """Train prompts as token ids (kept to their last data.max_length tokens unless truncation=error) and eval rows."""
    ids = []
    for row in read_rows(cfg.data.train_files):
        prompt = row.data.get("messages", row.data.get("prompt"))
        if not isinstance(prompt, str | list):
            raise DataError(f"{row.where}: a prompt row needs 'prompt' (a string) or 'messages' (a list)")
        tokens = encode_prompt(tokenizer, prompt)
        if len(tokens) > cfg.data.max_length:
            if cfg.data.truncation == "error":
                raise DataError(
                    f"{row.where}: {len(tokens)} prompt tokens is longer than data.max_length={cfg.data.max_length}"
                )
            tokens = tokens[-cfg.data.max_length :]
        ids.append(tokens)
    if not ids:
        raise DataError(f"no prompts in {', '.join(cfg.data.train_files) or '(data.train_files is empty)'}")
    return ids, read_rows(cfg.data.eval_files) if cfg.data.eval_files else []


def check_tokenizers_agree(tokenizer, cfg: PPOConfig) -> None:
    """The reward model must read the actor's tokens: same vocabulary and chat template, or it scores garbage."""
    for key, path in (("ppo.reward_model", cfg.ppo.reward_model), ("ppo.critic_path", cfg.ppo.critic_path)):
        if path is None or not (Path(path) / "tokenizer_config.json").is_file():
            continue
        other = load_tokenizer(ModelConfig(path=path))
        if other.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(
                f"{key}: the tokenizer at '{path}' has a different vocabulary from the actor's ({cfg.model.path})"
            )
        if other.chat_template != tokenizer.chat_template:
            raise ConfigError(f"{key}: the tokenizer at '{path}' has a different chat template from the actor's")


def log_samples(exp, tokenizer, logger, step: int, n: int = 4) -> None:
    rows = []
    for i in range(min(n, exp.sequences.size(0))):
        ids = exp.sequences[i][exp.attention_mask[i].bool()]
        start = int(exp.action_mask[i].argmax()) + 1
        rows.append(
            [
                tokenizer.decode(ids[:start], skip_special_tokens=True),
                tokenizer.decode(ids[start:], skip_special_tokens=True),
                exp.scores[i].item(),
            ]
        )
    logger.log_table("samples", ["prompt", "response", "score"], rows, step=step)
    dist.print0(f"sample @ {step}: {rows[0][0]!r} -> {rows[0][1]!r} (score {rows[0][2]:.2f})")
