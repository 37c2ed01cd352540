"""Supervised fine-tuning: next-token loss on response tokens only, on DeepSpeed ZeRO.

    deepspeed --num_gpus 8 --module distributed_pt.train configs/sft_tiny.yaml [key.sub=value ...]
    python -m distributed_pt.train configs/sft_tiny.yaml            # one process

Recipe: init distributed → seed → tokenizer/model → data → deepspeed.initialize → (resume) → loop → save/export.
Outputs in `output_dir`: config.yaml, metrics.jsonl, checkpoints/, final/ (HF model), summary.json.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from distributed_pt.config import SFTConfig, to_dict
from distributed_pt.data.collate import ShardedBatches, collate
from distributed_pt.data.sft import load_sft_data
from distributed_pt.engine import dist
from distributed_pt.engine.deepspeed import build_ds_config, initialize
from distributed_pt.engine.generation import exact_match, greedy_answers
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
from distributed_pt.losses.sft import causal_lm_loss
from distributed_pt.models.fused_loss import enable_fused_loss, use_fused_loss
from distributed_pt.models.loading import load_model, load_tokenizer
from distributed_pt.models.lora import apply_lora, count_trainable, prepare_for_gradient_checkpointing


def main(cfg: SFTConfig) -> dict:
    out = start(cfg)

    tokenizer = load_tokenizer(cfg.model)
    train_set, eval_set, eval_rows, stats = load_sft_data(tokenizer, cfg.data, cfg.train.seed)
    dist.print0(f"train: {stats['train'].summary()}\neval: {stats['eval'].summary()}")
    model = load_model(cfg.model, tokenizer)
    if cfg.lora.enabled:
        targets = apply_lora(model, cfg.lora)
        if cfg.model.gradient_checkpointing:
            prepare_for_gradient_checkpointing(model)
        dist.print0(f"LoRA r={cfg.lora.r} alpha={cfg.lora.alpha} on {len(targets)} layers")
    fused = use_fused_loss(cfg.loss.fused) and enable_fused_loss(model)
    dist.print0(f"loss: {'fused LM-head cross-entropy (Triton)' if fused else 'logits + torch cross-entropy'}")
    trainable, total = count_trainable(model)
    dist.print0(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)")

    batches = ShardedBatches(len(train_set), cfg.train.micro_batch_size, dist.rank(), dist.world_size(), cfg.train.seed)
    total_steps = cfg.train.max_steps or max(
        1, cfg.train.epochs * batches.per_epoch // cfg.train.gradient_accumulation_steps
    )
    ds_config = build_ds_config(cfg.deepspeed, cfg.train, cfg.optim, cfg.model.dtype, dist.world_size())
    engine = initialize(model, ds_config, cfg.optim, total_steps)

    state = State()
    resume(engine, cfg, state, fingerprint(tokenizer, cfg.data.train_files))
    logger = RunLogger(cfg.logging, cfg.output_dir, to_dict(cfg), resume_step=state.step)
    state.install_sigterm()

    first_eval = evaluate(engine, eval_set, eval_rows, tokenizer, cfg, fused) if state.step == 0 else {}
    if first_eval:
        logger.log(first_eval, step=0)
    try:
        train(engine, cfg, train_set, batches, eval_set, eval_rows, tokenizer, logger, state, total_steps, fused)
    except TrainingError as e:
        exit_early(logger, state, e)
    if should_stop(state):  # SIGTERM during training or just after it: checkpoint, exit 143
        save(engine, cfg, state)
        exit_early(logger, state)

    final_eval = evaluate(engine, eval_set, eval_rows, tokenizer, cfg, fused)
    logger.log(final_eval, step=state.step)
    save(engine, cfg, state)
    if cfg.checkpoint.export_hf:
        export(engine, tokenizer, cfg, out / "final")
    return finish(cfg, logger, state, first_eval, final_eval)


def train(engine, cfg, train_set, batches, eval_set, eval_rows, tokenizer, logger, state, total_steps, fused) -> None:
    gas = cfg.train.gradient_accumulation_steps
    micro_batches = batches.iterate(state.micro_step)
    bar = tqdm(total=total_steps, initial=state.step, disable=not (dist.is_main() and cfg.logging.progress_bar))
    timer = StepTimer(engine)
    while state.step < total_steps:
        for _ in range(gas):
            state.micro_step, indices = next(micro_batches)
            batch = collate([train_set[i] for i in indices], tokenizer.pad_token_id).to(engine.device)
            loss = causal_lm_loss(engine, batch.input_ids, batch.attention_mask, batch.labels, fused)
            check_finite(loss, state.step + 1)
            engine.backward(loss)
            engine.step()
            timer.add(batch.num_tokens, loss=loss)
        state.step += 1
        state.micro_step += 1
        bar.update(1)
        if state.step % cfg.train.log_every == 0 or state.step == total_steps:
            metrics = timer.flush()
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            logger.log(metrics, step=state.step, console=not cfg.logging.progress_bar)
        if cfg.train.eval_every and state.step % cfg.train.eval_every == 0 and state.step < total_steps:
            logger.log(evaluate(engine, eval_set, eval_rows, tokenizer, cfg, fused), step=state.step)
        if cfg.checkpoint.save_every and state.step % cfg.checkpoint.save_every == 0:
            save(engine, cfg, state)
        if should_stop(state):
            break
    bar.close()


@torch.no_grad()
def evaluate(engine, eval_set, eval_rows, tokenizer, cfg: SFTConfig, fused: bool) -> dict:
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
        n = (b.labels[:, 1:] != -100).sum()
        loss = causal_lm_loss(engine.module, b.input_ids, b.attention_mask, b.labels, fused)
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
