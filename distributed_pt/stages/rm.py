"""Reward modelling: a scalar head on the LM, trained so r(chosen) > r(rejected), on DeepSpeed ZeRO.

    deepspeed --num_gpus 8 --module distributed_pt.train configs/rm_tiny.yaml [key.sub=value ...]

Loss: -log sigmoid(r_chosen - r_rejected - margin) (+ reward.center_coef * mean(r^2)); chosen and rejected of a
batch go through the model in one forward pass. Outputs in `output_dir`: config.yaml, metrics.jsonl, checkpoints/,
final/ (an HF `*ForSequenceClassification` with num_labels=1, plus `reward_stats.json`: the eval reward mean/std
that PPO normalises scores with), summary.json.
"""

from __future__ import annotations

import json

import torch
from tqdm.auto import tqdm

from distributed_pt.config import RMConfig, to_dict
from distributed_pt.data.collate import ShardedBatches
from distributed_pt.data.preference import collate_pairs, load_preference_data
from distributed_pt.engine import dist
from distributed_pt.engine.deepspeed import build_ds_config, initialize
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
from distributed_pt.engine.metrics import StepTimer
from distributed_pt.logging import RunLogger
from distributed_pt.losses.pairwise import pairwise_loss, pairwise_metrics
from distributed_pt.models.loading import load_tokenizer
from distributed_pt.models.lora import apply_lora, count_trainable, prepare_for_gradient_checkpointing
from distributed_pt.models.reward import load_reward_model, sequence_rewards

STATS_FILE = "reward_stats.json"


def main(cfg: RMConfig) -> dict:
    if cfg.lora.enabled and "score" not in cfg.lora.modules_to_save:
        cfg.lora.modules_to_save.append("score")  # the head always trains in full
    out = start(cfg)

    tokenizer = load_tokenizer(cfg.model)
    train_set, eval_set, stats = load_preference_data(tokenizer, cfg.data, cfg.train.seed, cfg.reward.use_margin)
    dist.print0(f"train: {stats['train'].summary()}\neval: {stats['eval'].summary()}")
    model = load_reward_model(cfg.model, tokenizer)
    if cfg.lora.enabled:
        targets = apply_lora(model, cfg.lora)
        if cfg.model.gradient_checkpointing:
            prepare_for_gradient_checkpointing(model)
        dist.print0(f"LoRA r={cfg.lora.r} alpha={cfg.lora.alpha} on {len(targets)} layers, head trained in full")
    trainable, total = count_trainable(model)
    dist.print0(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)")

    batches = ShardedBatches(len(train_set), cfg.train.micro_batch_size, dist.rank(), dist.world_size(), cfg.train.seed)
    gas = cfg.train.gradient_accumulation_steps
    total_steps = cfg.train.max_steps or max(1, cfg.train.epochs * batches.per_epoch // gas)
    ds_config = build_ds_config(cfg.deepspeed, cfg.train, cfg.optim, cfg.model.dtype, dist.world_size())
    engine = initialize(model, ds_config, cfg.optim, total_steps)

    state = State()
    resume(engine, cfg, state, fingerprint(tokenizer, cfg.data.train_files))
    logger = RunLogger(cfg.logging, cfg.output_dir, to_dict(cfg), resume_step=state.step)
    state.install_sigterm()

    first_eval = evaluate(engine, eval_set, tokenizer, cfg) if state.step == 0 else {}
    if first_eval:
        logger.log(first_eval, step=0)
    try:
        train(engine, cfg, train_set, batches, eval_set, tokenizer, logger, state, total_steps)
    except TrainingError as e:
        exit_early(logger, state, e)
    if should_stop(state):  # SIGTERM during training or just after it: checkpoint, exit 143
        save(engine, cfg, state)
        exit_early(logger, state)

    final_eval = evaluate(engine, eval_set, tokenizer, cfg)
    logger.log(final_eval, step=state.step)
    save(engine, cfg, state)
    if cfg.checkpoint.export_hf:
        export(engine, tokenizer, cfg, out / "final", task_type="SEQ_CLS")
        if dist.is_main():
            reward_stats = {
                "mean": final_eval.get("eval/reward_mean", 0.0),
                "std": final_eval.get("eval/reward_std", 1.0),
            }
            (out / "final" / STATS_FILE).write_text(json.dumps(reward_stats, indent=1))
    return finish(cfg, logger, state, first_eval, final_eval)


def train(engine, cfg, train_set, batches, eval_set, tokenizer, logger, state, total_steps) -> None:
    micro_batches = batches.iterate(state.micro_step)
    bar = tqdm(total=total_steps, initial=state.step, disable=not (dist.is_main() and cfg.logging.progress_bar))
    timer = StepTimer(engine)
    while state.step < total_steps:
        for _ in range(cfg.train.gradient_accumulation_steps):
            state.micro_step, indices = next(micro_batches)
            ids, mask, margin = collate_pairs([train_set[i] for i in indices], tokenizer.pad_token_id)
            chosen, rejected = sequence_rewards(engine, ids.to(engine.device), mask.to(engine.device)).chunk(2)
            margin = margin.to(engine.device) if cfg.reward.use_margin else None
            loss = pairwise_loss(chosen, rejected, margin, cfg.reward.center_coef)
            check_finite(loss, state.step + 1)
            engine.backward(loss)
            engine.step()
            timer.add(int(mask.sum()), loss=loss, **pairwise_metrics(chosen, rejected))
        state.step += 1
        state.micro_step += 1
        bar.update(1)
        if state.step % cfg.train.log_every == 0 or state.step == total_steps:
            metrics = timer.flush()
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.2f}")
            logger.log(metrics, step=state.step, console=not cfg.logging.progress_bar)
        if cfg.train.eval_every and state.step % cfg.train.eval_every == 0 and state.step < total_steps:
            logger.log(evaluate(engine, eval_set, tokenizer, cfg), step=state.step)
        if cfg.checkpoint.save_every and state.step % cfg.checkpoint.save_every == 0:
            save(engine, cfg, state)
        if should_stop(state):
            break
    bar.close()


@torch.no_grad()
def evaluate(engine, eval_set, tokenizer, cfg: RMConfig) -> dict:
    """Loss, accuracy, mean margin and exact reward mean/std over the eval pairs (equal shares per rank, so ZeRO-3's
    gathers stay in step; a remainder of fewer than world-size pairs is left out)."""
    if not eval_set:
        return {}
    engine.eval()
    mbs = cfg.train.micro_batch_size
    mine = dist.equal_share(eval_set)
    sums = torch.zeros(6)  # loss*n, correct, margin, pairs, reward sum, reward^2 sum
    for i in range(0, len(mine), mbs):
        ids, mask, margin = collate_pairs(mine[i : i + mbs], tokenizer.pad_token_id)
        chosen, rejected = sequence_rewards(engine.module, ids.to(engine.device), mask.to(engine.device)).chunk(2)
        chosen, rejected = chosen.float().cpu(), rejected.float().cpu()
        loss = pairwise_loss(chosen, rejected, margin if cfg.reward.use_margin else None)
        rewards = torch.cat([chosen, rejected])
        n = len(chosen)
        sums += torch.tensor(
            [loss * n, (chosen > rejected).sum(), (chosen - rejected).sum(), n, rewards.sum(), rewards.pow(2).sum()]
        )
    loss, correct, margin, n, r_sum, r_sq = dist.all_reduce_sum(sums).tolist()
    mean = r_sum / max(2 * n, 1)
    engine.train()
    return {
        "eval/loss": loss / max(n, 1),
        "eval/accuracy": correct / max(n, 1),
        "eval/margin": margin / max(n, 1),
        "eval/reward_mean": mean,
        "eval/reward_std": max(r_sq / max(2 * n, 1) - mean**2, 0.0) ** 0.5,
    }
