"""Reward modelling: a scalar head on the LM, trained so r(chosen) > r(rejected), on DeepSpeed ZeRO.

    deepspeed --num_gpus 8 --module distributed_pt.train configs/rm_tiny.yaml [key.sub=value ...]

Loss: -log sigmoid(r_chosen - r_rejected - margin) (+ reward.center_coef * mean(r^2)); chosen and rejected of a
batch go through the model in one forward pass. Outputs in `output_dir`: config.yaml, metrics.jsonl, checkpoints/,
final/ (an HF `*ForSequenceClassification` with num_labels=1, plus `reward_stats.json`: the eval reward mean/std
that PPO normalises scores with), summary.json.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from distributed_pt import dist
from distributed_pt.config import RMConfig
from distributed_pt.data.collate import Batch, Examples, ShardedBatches
from distributed_pt.data.packing import PackedDataset, collate_packed_pairs
from distributed_pt.data.preference import collate_pairs, load_preference_data
from distributed_pt.engine import sequence
from distributed_pt.engine.deepspeed import initialize, stage_ds_config
from distributed_pt.engine.loop import Run, check_finite, data_cache, export, fingerprint, start
from distributed_pt.engine.metrics import StepTimer
from distributed_pt.losses.pairwise import pairwise_loss, pairwise_metrics
from distributed_pt.models.heads import Backbone, sequence_rewards, token_scores
from distributed_pt.models.loading import load_tokenizer, make_trainable
from distributed_pt.models.reward import load_reward_model, save_reward_stats

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


def main(cfg: RMConfig) -> dict:
    if cfg.lora.enabled and "score" not in cfg.lora.modules_to_save:
        cfg.lora.modules_to_save.append("score")  # the head always trains in full
    start(cfg)
    tokenizer = load_tokenizer(cfg.model)
    data_args = (tokenizer, cfg.data, cfg.train.seed, cfg.reward.use_margin, data_cache(cfg))
    train_set, eval_set, stats = load_preference_data(*data_args)
    dist.print0(f"train: {stats['train'].summary()}\neval: {stats['eval'].summary()}")
    if cfg.data.packing:  # whole pairs per row: a pair's two sides are read in the same forward pass
        train_set = PackedDataset(train_set, cfg.data.max_length)
        dist.print0(f"packing: {len(train_set)} rows, {train_set.efficiency(cfg.data.max_length):.1%} filled")
    model = load_reward_model(cfg.model, tokenizer)
    make_trainable(model, cfg.lora, cfg.model.gradient_checkpointing)

    mpu = sequence.setup(model, cfg, rows=2, packing=cfg.data.packing)  # None without sequence parallelism
    batches = ShardedBatches(len(train_set), cfg.train.micro_batch_size, *sequence.data_parallel(cfg), cfg.train.seed)
    total_steps = cfg.train.total_steps(batches.per_epoch, cfg.train.gradient_accumulation_steps)
    engine = initialize(Backbone(model), stage_ds_config(cfg), cfg.optim, total_steps, mpu)

    run = Run(cfg, engine, total_steps, fingerprint(tokenizer, cfg.data.train_files))
    before, after = run.train(
        lambda: train(run, engine, train_set, batches, tokenizer.pad_token_id),
        lambda: evaluate(engine, eval_set, tokenizer.pad_token_id, cfg),
    )
    if cfg.checkpoint.export_hf:
        export(engine, tokenizer, cfg, run.out / "final", task_type="SEQ_CLS")
        if dist.is_main():
            save_reward_stats(run.out / "final", after.get("eval/reward_mean", 0.0), after.get("eval/reward_std", 1.0))
    return run.finish(before, after)


def train(run: Run, engine: DeepSpeedEngine, train_set: Examples, batches: ShardedBatches, pad_id: int) -> None:
    cfg = run.cfg
    micro_batches = batches.iterate(run.state.micro_step)
    timer = StepTimer(engine)
    while run.training():
        for _ in range(cfg.train.gradient_accumulation_steps):
            run.state.micro_step, indices = next(micro_batches)
            items = train_set.examples(indices)
            chosen, rejected, margin, batch = pair_rewards(engine, items, pad_id, cfg.deepspeed.sequence_parallel_size)
            margin = margin.to(engine.device) if cfg.reward.use_margin else None
            loss = pairwise_loss(chosen, rejected, margin, cfg.reward.center_coef)
            check_finite(loss, run.state.step + 1)
            engine.backward(loss / cfg.deepspeed.sequence_parallel_size)  # each shard's 1/SP (engine.sequence)
            engine.step()
            metrics = pairwise_metrics(chosen, rejected)
            timer.add(batch.num_tokens, 2 * len(chosen), batch.input_ids.numel(), loss=loss, **metrics)
        run.end_step(timer.flush, postfix=("loss", "accuracy"))


def pair_rewards(
    engine: DeepSpeedEngine, items: list, pad_id: int, sp: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Batch]:
    """Rewards of a micro batch: (chosen (P,), rejected (P,), margin (P,), the collated batch). `items` are pairs,
    or packed rows of pairs (lists), whose rewards are read at each side's last token; `sp`: sequence parallelism."""
    sharded = sp > 1 and engine.module.training  # evaluation runs whole sequences (DeepSpeed's eval() sets the mode)
    if items and isinstance(items[0], list):
        batch, chosen_at, rejected_at, margin = collate_packed_pairs(items, pad_id)
        b, at = batch.to(engine.device), torch.cat([chosen_at, rejected_at]).to(engine.device)
        if sharded:
            scores = sequence.sequence_rewards(engine, b.input_ids, b.attention_mask, sp, b.position_ids, at)
        else:
            scores = token_scores(engine, b.input_ids, None, b.position_ids)[at[:, 0], at[:, 1]]
        chosen, rejected = scores.chunk(2)
        return chosen, rejected, margin, batch
    ids, mask, margin = collate_pairs(items, pad_id)
    on = ids.to(engine.device), mask.to(engine.device)
    if sharded:
        chosen, rejected = sequence.sequence_rewards(engine, *on, sp).chunk(2)
    else:
        chosen, rejected = sequence_rewards(engine, *on).chunk(2)
    return chosen, rejected, margin, Batch(ids, mask, ids)


@torch.no_grad()
def evaluate(engine: DeepSpeedEngine, eval_set: Examples, pad_id: int, cfg: RMConfig) -> dict[str, float]:
    """Loss, accuracy, mean margin and exact reward mean/std over the eval pairs (equal shares per rank, so ZeRO-3's
    gathers stay in step; a remainder of fewer than world-size pairs is left out)."""
    if not eval_set:
        return {}
    engine.eval()
    mbs = cfg.train.micro_batch_size
    mine = dist.equal_share(list(range(len(eval_set))))  # indices
    sums = torch.zeros(6)  # loss*n, correct, margin, pairs, reward sum, reward^2 sum
    for i in range(0, len(mine), mbs):
        chosen, rejected, margin, _ = pair_rewards(engine, eval_set.examples(mine[i : i + mbs]), pad_id)
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
