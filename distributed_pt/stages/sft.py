"""Supervised fine-tuning: next-token loss on response tokens only, on DeepSpeed ZeRO.

    deepspeed --num_gpus 8 --module distributed_pt.train configs/sft_tiny.yaml [key.sub=value ...]
    python -m distributed_pt.train configs/sft_tiny.yaml            # one process

Recipe: init distributed → seed → tokenizer/model → data → deepspeed.initialize → (resume) → loop → save/export.
Outputs in `output_dir`: config.yaml, metrics.jsonl, checkpoints/, final/ (HF model), summary.json.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from distributed_pt import dist
from distributed_pt.config import SFTConfig
from distributed_pt.data.collate import Examples, ShardedBatches, collate
from distributed_pt.data.io import Row
from distributed_pt.data.packing import PackedDataset, collate_packed
from distributed_pt.data.sft import load_sft_data
from distributed_pt.engine import sequence
from distributed_pt.engine.deepspeed import initialize, stage_ds_config
from distributed_pt.engine.generation import exact_match, greedy_answers
from distributed_pt.engine.loop import Run, check_finite, data_cache, export, fingerprint, start
from distributed_pt.engine.metrics import StepTimer
from distributed_pt.models.heads import Backbone, lm_loss, use_fused_loss
from distributed_pt.models.loading import load_model, load_tokenizer, make_trainable

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from transformers import PreTrainedTokenizerBase


def main(cfg: SFTConfig) -> dict:
    start(cfg)
    tokenizer = load_tokenizer(cfg.model)
    train_set, eval_set, eval_rows, stats = load_sft_data(tokenizer, cfg.data, cfg.train.seed, data_cache(cfg))
    dist.print0(f"train: {stats['train'].summary()}\neval: {stats['eval'].summary()}")
    if cfg.data.packing:
        train_set = PackedDataset(train_set, cfg.data.max_length)
        efficiency = train_set.efficiency(cfg.data.max_length)
        dist.print0(f"packing: {len(train_set)} rows of {cfg.data.max_length} tokens, {efficiency:.1%} of them filled")
    model = load_model(cfg.model, tokenizer)
    make_trainable(model, cfg.lora, cfg.model.gradient_checkpointing)
    fused = use_fused_loss(cfg.loss.fused, model)
    dist.print0(f"loss: {'fused LM-head cross-entropy (Triton)' if fused else 'logits + torch cross-entropy'}")

    mpu = sequence.setup(model, cfg, packing=cfg.data.packing)  # None without sequence parallelism
    batches = ShardedBatches(len(train_set), cfg.train.micro_batch_size, *sequence.data_parallel(cfg), cfg.train.seed)
    total_steps = cfg.train.total_steps(batches.per_epoch, cfg.train.gradient_accumulation_steps)
    engine = initialize(Backbone(model), stage_ds_config(cfg), cfg.optim, total_steps, mpu)

    run = Run(cfg, engine, total_steps, fingerprint(tokenizer, cfg.data.train_files))
    before, after = run.train(
        lambda: train(run, engine, train_set, batches, tokenizer.pad_token_id, fused),
        lambda: evaluate(engine, eval_set, eval_rows, tokenizer, cfg, fused),
    )
    if cfg.checkpoint.export_hf:
        export(engine, tokenizer, cfg, run.out / "final")
    return run.finish(before, after)


def train(
    run: Run, engine: DeepSpeedEngine, train_set: Examples, batches: ShardedBatches, pad_id: int, fused: bool
) -> None:
    """The loss of a step is the sum of its token losses over the response tokens of the whole step (every micro
    batch, every rank): the update does not depend on how the step's examples are split into micro batches, ranks,
    packed rows or sequence-parallel shards (`engine.sequence`)."""
    micro_batches = batches.iterate(run.state.micro_step)
    make_batch = collate_packed if isinstance(train_set, PackedDataset) else collate
    timer, world = StepTimer(engine), dist.world_size()
    sp = run.cfg.deepspeed.sequence_parallel_size
    replicas = world // sp  # DeepSpeed averages gradients over the data-parallel replicas, sums over shards
    while run.training():
        step = [next(micro_batches) for _ in range(run.cfg.train.gradient_accumulation_steps)]
        micro = [make_batch(train_set.examples(indices), pad_id) for _, indices in step]
        if sp > 1:
            micro = [sequence.shard(b, sp, dist.rank() % sp, pad_id) for b in micro]
        targets = dist.all_reduce_sum(torch.tensor([float(sum(b.num_targets for b in micro))])).item()
        for (run.state.micro_step, _), batch in zip(step, micro, strict=True):
            batch = batch.to(engine.device)
            loss = lm_loss(engine, batch, fused, reduction="sum") / max(targets, 1.0)  # this batch's share
            check_finite(loss, run.state.step + 1)
            engine.backward(loss * replicas, scale_wrt_gas=False)
            engine.step()
            timer.add(batch.num_tokens, batch.num_sequences, batch.input_ids.numel(), loss=loss * len(step) * world)
        run.end_step(timer.flush)  # loss: the mean over micro batches and ranks of `loss`, i.e. the step's token mean


@torch.no_grad()
def evaluate(
    engine: DeepSpeedEngine,
    eval_set: Examples,
    eval_rows: list[Row],
    tokenizer: PreTrainedTokenizerBase,
    cfg: SFTConfig,
    fused: bool,
) -> dict[str, float]:
    """Eval loss/perplexity over the eval set and greedy exact-match accuracy on the first eval rows.

    Each rank takes an equal share (a remainder of fewer than world-size examples is left out) so that ZeRO-3's
    collective parameter gathers stay in step across ranks.
    """
    if not eval_set:
        return {}
    engine.eval()
    mbs = cfg.train.micro_batch_size
    mine = dist.equal_share(list(range(len(eval_set))))  # indices
    totals = torch.zeros(2)
    for i in range(0, len(mine), mbs):
        b = collate(eval_set.examples(mine[i : i + mbs]), tokenizer.pad_token_id)
        loss_sum = lm_loss(engine, b.to(engine.device), fused, reduction="sum")
        totals += torch.tensor([loss_sum.item(), b.num_targets])
    loss_sum, tokens = dist.all_reduce_sum(totals).tolist()
    metrics = {"eval/loss": loss_sum / max(tokens, 1)}
    metrics["eval/perplexity"] = math.exp(min(metrics["eval/loss"], 50.0))
    if cfg.eval.num_generate > 0:
        rows = eval_rows[: cfg.eval.num_generate]
        answers = greedy_answers(engine, rows, tokenizer, cfg.train.micro_batch_size, cfg.eval.max_new_tokens)
        metrics["eval/exact_match"] = exact_match(answers)
    engine.train()
    return metrics
