"""Classification: a K-class head on a causal LM's pooled hidden state, trained by cross-entropy on DeepSpeed ZeRO.

    deepspeed --num_gpus 2 --module distributed_pt.train configs/classify_tiny.yaml classify.mode=feature|lora|full

One switch, three modes (`classify.mode`): ``feature`` freezes the backbone, computes its pooled features once (cached
beside the tokenized data, keyed by the backbone's weights) and trains only the head on them: no backbone forward per
epoch; ``lora`` trains adapters (`lora.*`) and the head; ``full`` trains every weight (ZeRO 0-3 for both). Rows:
``{"text", "label"}`` or ``{"text", "text_pair", "label"}`` (`data.classify`); loss: cross-entropy
(`classify.class_weights`). Eval: loss, accuracy, macro-F1, per-class precision/recall and the confusion matrix (a
W&B table, and summary.json's "confusion").

Outputs in `output_dir`: config.yaml, metrics.jsonl, checkpoints/, summary.json and final/: an HF
``*ForSequenceClassification`` with id2label/label2id (lora and full; LoRA adds adapter/), or, in feature mode, the
head alone (head.safetensors + classifier.json), which `models.classifier.load_feature_classifier` puts back onto the
same backbone.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from distributed_pt import dist
from distributed_pt.config import ClassifyConfig, ConfigError
from distributed_pt.data.classify import collate_classes, label_names, load_classify_data
from distributed_pt.data.collate import ShardedBatches
from distributed_pt.engine.deepspeed import initialize, stage_ds_config
from distributed_pt.engine.loop import Run, check_finite, data_cache, export, fingerprint, start
from distributed_pt.engine.metrics import StepTimer
from distributed_pt.models.classifier import (
    CLASSIFIER_FILE,
    ClassifierHead,
    FeatureSet,
    cached_features,
    class_logits,
    classification_metrics,
    load_classifier,
    save_head,
)
from distributed_pt.models.heads import Backbone
from distributed_pt.models.loading import load_tokenizer, make_trainable
from distributed_pt.models.lora import count_trainable
from distributed_pt.models.zero import num_parameters, unwrap

if TYPE_CHECKING:
    from pathlib import Path

    from deepspeed import DeepSpeedEngine
    from transformers import PreTrainedTokenizerBase


def check_config(cfg: ClassifyConfig) -> None:
    """Settings the stage cannot run with, each a ConfigError naming its key."""
    if cfg.data.packing:
        raise ConfigError("data.packing: the classify stage reads one pooled state per row; packing is not supported")
    if cfg.lora.enabled and cfg.classify.mode != "lora":
        raise ConfigError(f"lora.enabled: set classify.mode=lora instead (classify.mode is {cfg.classify.mode!r})")
    if cfg.deepspeed.sequence_parallel_size != 1:
        raise ConfigError("deepspeed.sequence_parallel_size: the classify stage does not split sequences")


def main(cfg: ClassifyConfig) -> dict:
    check_config(cfg)
    mode, pooling = cfg.classify.mode, cfg.classify.pooling
    cfg.lora.enabled = mode == "lora"
    if cfg.lora.enabled and "score" not in cfg.lora.modules_to_save:
        cfg.lora.modules_to_save.append("score")  # the head always trains in full
    start(cfg)
    tokenizer = load_tokenizer(cfg.model)
    labels = label_names(cfg.data.train_files, cfg.classify.labels)
    if cfg.classify.class_weights and len(cfg.classify.class_weights) != len(labels):
        raise ConfigError(f"classify.class_weights: {len(cfg.classify.class_weights)} weights for {len(labels)} "
                          f"classes {labels}")  # fmt: skip
    train_set, eval_set, stats = load_classify_data(tokenizer, cfg.data, cfg.train.seed, labels, data_cache(cfg))
    dist.print0(f"classes: {labels}\ntrain: {stats['train'].summary()}\neval: {stats['eval'].summary()}")
    model = load_classifier(cfg.model, tokenizer, labels)
    parameters = num_parameters(model)
    inputs = fingerprint(tokenizer, cfg.data.train_files) | {"classes": ",".join(labels)}
    digest, feature_seconds = None, 0.0
    if mode == "feature":  # features once, then the head alone: the backbone leaves memory
        model.requires_grad_(False)
        if dist.is_main():
            model.to(dist.device())
        splits, info = cached_features(
            model, {"train": train_set, "eval": eval_set}, pooling, data_cache(cfg), tokenizer.pad_token_id,
            cfg.train.micro_batch_size,
        )  # fmt: skip
        train_set, eval_set = splits["train"], splits["eval"]
        digest, feature_seconds = info["backbone"], 0.0 if info["hit"] else info["seconds"]
        inputs["backbone"] = digest  # a checkpoint's head belongs to these features
        module = ClassifierHead(model.score)
        del model
    else:
        make_trainable(model, cfg.lora, cfg.model.gradient_checkpointing)
        module = Backbone(model)

    batches = ShardedBatches(len(train_set), cfg.train.micro_batch_size, dist.rank(), dist.world_size(), cfg.train.seed)
    total_steps = cfg.train.total_steps(batches.per_epoch, cfg.train.gradient_accumulation_steps)
    engine = initialize(module, stage_ds_config(cfg), cfg.optim, total_steps)
    weights = torch.tensor(cfg.classify.class_weights, device=engine.device) if cfg.classify.class_weights else None

    run = Run(cfg, engine, total_steps, inputs)
    trainable = count_trainable(engine)[0]
    dist.print0(f"classify: mode {mode}, {trainable:,} trainable of {parameters:,} parameters")
    run.logger.log({"model/trainable_params": trainable, "model/params": parameters,
                    "time/features_s": feature_seconds}, step=run.state.step)  # fmt: skip
    confusion: dict[str, torch.Tensor] = {}

    def evaluate_and_table() -> dict[str, float]:
        metrics, confusion["last"] = evaluate(engine, eval_set, labels, tokenizer.pad_token_id, cfg)
        rows = [[name, *map(int, row)] for name, row in zip(labels, confusion["last"].tolist(), strict=True)]
        run.logger.log_table("eval/confusion", ["true \\ predicted", *labels], rows, step=run.state.step)
        return metrics

    before, after = run.train(
        lambda: train(run, engine, train_set, batches, tokenizer.pad_token_id, weights), evaluate_and_table
    )
    if cfg.checkpoint.export_hf:
        export_classifier(engine, tokenizer, cfg, labels, run.out / "final", digest)
    main_rank = dist.is_main()  # (after finish every process reads as rank 0)
    summary = run.finish(before, after)
    summary |= {"classes": labels, "confusion": confusion["last"].long().tolist() if confusion else None}
    summary |= {"parameters": {"trainable": trainable, "total": parameters, "mode": mode}}
    if main_rank:
        (run.out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def batch_logits(
    engine: DeepSpeedEngine, data: Any, indices: list[int], pad_id: int, pooling: str
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(logits (B, K) float32, labels (B,), real tokens, token slots) of the examples at `indices`: tokenized rows
    through the model, or (feature mode) cached features through the head (a row counts as one token)."""
    if isinstance(data, FeatureSet):
        x, y = data.batch(indices)
        return engine(x.to(engine.device)), y.to(engine.device), len(y), len(y)
    ids, mask, y = collate_classes(data.examples(indices), pad_id)
    logits = class_logits(engine, ids.to(engine.device), mask.to(engine.device), pooling)
    return logits, y.to(engine.device), int(mask.sum()), ids.numel()


def train(
    run: Run,
    engine: DeepSpeedEngine,
    train_set: Any,
    batches: ShardedBatches,
    pad_id: int,
    weights: torch.Tensor | None,
) -> None:
    cfg = run.cfg
    micro_batches = batches.iterate(run.state.micro_step)
    timer, started = StepTimer(engine), time.perf_counter()
    while run.training():
        for _ in range(cfg.train.gradient_accumulation_steps):
            run.state.micro_step, indices = next(micro_batches)
            logits, labels, tokens, slots = batch_logits(engine, train_set, indices, pad_id, cfg.classify.pooling)
            loss = F.cross_entropy(logits, labels, weight=weights)
            check_finite(loss, run.state.step + 1)
            engine.backward(loss)
            engine.step()
            accuracy = (logits.argmax(-1) == labels).float().mean()
            timer.add(tokens, len(labels), slots, loss=loss, accuracy=accuracy)
        run.end_step(timer.flush, postfix=("loss", "accuracy"))
    run.logger.log({"time/train_s": time.perf_counter() - started}, step=run.state.step)


@torch.no_grad()
def evaluate(
    engine: DeepSpeedEngine, eval_set: Any, labels: list[str], pad_id: int, cfg: ClassifyConfig
) -> tuple[dict[str, float], torch.Tensor]:
    """(loss, accuracy, macro-F1, per-class precision/recall; the (K, K) confusion matrix, rows the true class) over
    the eval rows, in equal shares per rank (ZeRO-3's gathers stay in step; a remainder under world size is left out).
    """
    k = len(labels)
    if not len(eval_set):
        return {}, torch.zeros(k, k)
    engine.eval()
    mbs = cfg.train.micro_batch_size
    mine = dist.equal_share(list(range(len(eval_set))))
    confusion, loss_sum = torch.zeros(k, k), torch.zeros(1)
    for i in range(0, len(mine), mbs):
        logits, y, _, _ = batch_logits(engine, eval_set, mine[i : i + mbs], pad_id, cfg.classify.pooling)
        y, logits = y.cpu(), logits.cpu()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        confusion.index_put_((y, logits.argmax(-1)), torch.ones(len(y)), accumulate=True)
    totals = dist.all_reduce_sum(torch.cat([confusion.flatten(), loss_sum]))
    confusion = totals[:-1].view(k, k)
    engine.train()
    metrics = {"eval/loss": totals[-1].item() / max(confusion.sum().item(), 1.0)}
    return metrics | classification_metrics(confusion, labels), confusion


def export_classifier(
    engine: DeepSpeedEngine,
    tokenizer: PreTrainedTokenizerBase,
    cfg: ClassifyConfig,
    labels: list[str],
    out: Path,
    digest: str | None,
) -> None:
    """final/: the HF model through the shared export (lora, full), or the feature-mode head alone; classifier.json
    beside either (mode, labels, pooling; feature mode: the backbone's source and digest)."""
    meta: dict[str, Any] = {"mode": cfg.classify.mode, "labels": labels, "pooling": cfg.classify.pooling}
    if cfg.classify.pooling == "mean":
        dist.print0("export: mean pooling; AutoModelForSequenceClassification reads the last token, so predict with "
                    "models.classifier.class_logits")  # fmt: skip
    if cfg.classify.mode == "feature":
        m = cfg.model
        meta |= {"dtype": m.dtype, "backbone": {"path": m.path, "preset": m.preset, "init_config": m.init_config,
                                                 "digest": digest}}  # fmt: skip
        save_head(unwrap(engine), out, meta)
        return
    export(engine, tokenizer, cfg, out, task_type="SEQ_CLS")
    if dist.is_main():
        (out / CLASSIFIER_FILE).write_text(json.dumps(meta, indent=1))
