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
from distributed_pt.data.collate import ShardedBatches, collate
from distributed_pt.data.io import Row
from distributed_pt.data.sft import IGNORE_INDEX, Example, load_sft_data
from distributed_pt.engine.deepspeed import initialize, stage_ds_config
from distributed_pt.engine.generation import exact_match, greedy_answers
from distributed_pt.engine.loop import Run, check_finite, export, fingerprint, start
from distributed_pt.engine.metrics import StepTimer
from distributed_pt.models.heads import Backbone, lm_loss, use_fused_loss
from distributed_pt.models.loading import load_model, load_tokenizer, make_trainable

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from transformers import PreTrainedTokenizerBase


def main(cfg: SFTConfig) -> dict:
    start(cfg)
    tokenizer = load_tokenizer(cfg.model)
    train_set, eval_set, eval_rows, stats = load_sft_data(tokenizer, cfg.data, cfg.train.seed)
    dist.print0(f"train: {stats['train'].summary()}\neval: {stats['eval'].summary()}")
    model = load_model(cfg.model, tokenizer)
    make_trainable(model, cfg.lora, cfg.model.gradient_checkpointing)
    fused = use_fused_loss(cfg.loss.fused, model)
    dist.print0(f"loss: {'fused LM-head cross-entropy (Triton)' if fused else 'logits + torch cross-entropy'}")

    batches = ShardedBatches(len(train_set), cfg.train.micro_batch_size, dist.rank(), dist.world_size(), cfg.train.seed)
    total_steps = cfg.train.total_steps(batches.per_epoch, cfg.train.gradient_accumulation_steps)
    engine = initialize(Backbone(model), stage_ds_config(cfg), cfg.optim, total_steps)

    run = Run(cfg, engine, total_steps, fingerprint(tokenizer, cfg.data.train_files))
    before, after = run.train(
        lambda: train(run, engine, train_set, batches, tokenizer.pad_token_id, fused),
        lambda: evaluate(engine, eval_set, eval_rows, tokenizer, cfg, fused),
    )
    if cfg.checkpoint.export_hf:
        export(engine, tokenizer, cfg, run.out / "final")
    return run.finish(before, after)


def train(
    run: Run, engine: DeepSpeedEngine, train_set: list[Example], batches: ShardedBatches, pad_id: int, fused: bool
) -> None:
    micro_batches = batches.iterate(run.state.micro_step)
    timer = StepTimer(engine)
    while run.training():
        for _ in range(run.cfg.train.gradient_accumulation_steps):
            run.state.micro_step, indices = next(micro_batches)
            batch = collate([train_set[i] for i in indices], pad_id).to(engine.device)
            loss = lm_loss(engine, batch.input_ids, batch.attention_mask, batch.labels, fused)
            check_finite(loss, run.state.step + 1)
            engine.backward(loss)
            engine.step()
            timer.add(batch.num_tokens, len(batch.input_ids), loss=loss)
        run.end_step(timer.flush)


@torch.no_grad()
def evaluate(
    engine: DeepSpeedEngine,
    eval_set: list[Example],
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
    mine = dist.equal_share(eval_set)
    totals = torch.zeros(2)
    for i in range(0, len(mine), mbs):
        b = collate(mine[i : i + mbs], tokenizer.pad_token_id).to(engine.device)
        n = (b.labels[:, 1:] != IGNORE_INDEX).sum()
        loss = lm_loss(engine, b.input_ids, b.attention_mask, b.labels, fused)
        totals += torch.stack([loss.float().cpu() * n.cpu(), n.cpu().float()])
    loss_sum, tokens = dist.all_reduce_sum(totals).tolist()
    metrics = {"eval/loss": loss_sum / max(tokens, 1)}
    metrics["eval/perplexity"] = math.exp(min(metrics["eval/loss"], 50.0))
    if cfg.eval.num_generate > 0:
        rows = eval_rows[: cfg.eval.num_generate]
        answers = greedy_answers(engine, rows, tokenizer, cfg.train.micro_batch_size, cfg.eval.max_new_tokens)
        metrics["eval/exact_match"] = exact_match(answers)
    engine.train()
    return metrics
