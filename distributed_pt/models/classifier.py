"""Classifiers on a causal LM: a K-class head (the ``score`` of an HF ``*ForSequenceClassification``) on one pooled
hidden state per sequence; for feature mode, those features computed once and cached on disk, a head trained alone,
and its small export.

    model = load_classifier(cfg.model, tokenizer, labels)            # num_labels, id2label, label2id set
    logits = class_logits(engine, input_ids, attention_mask, "last")   # (B, K) float32, through a models.heads.Backbone
    features, info = cached_features(model, {"train": ..., "eval": ...}, "last", cache_dir, pad_id, 64)
    save_head(head, out_dir, meta); model = load_feature_classifier(out_dir)   # feature mode: head.safetensors

Pooling ``last`` reads the last non-padding token (left or right padding alike): the HF class reads the same one
(the last id that is not ``pad_token_id``), so an exported model predicts with transformers alone. ``mean`` averages
the real tokens' hidden states; the HF class cannot, so use `class_logits` for such a model.

The feature cache: ``<cache_dir>/features-<32 hex>/{train,eval}.safetensors`` (features (N, H) float32, labels (N,))
and ``meta.json``. The key hashes the tokenized data's cache name (tokenizer, files, labels, max length), the pooling
and `backbone_digest` (every backbone weight's bytes): another backbone never reads these features.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

from distributed_pt import dist
from distributed_pt.config import ConfigError, ModelConfig
from distributed_pt.data.classify import collate_classes
from distributed_pt.models.heads import Backbone, last_token_index
from distributed_pt.models.loading import (
    DTYPES,
    attention_implementation,
    check_model_source,
    enable_gradient_checkpointing,
    init_model_config,
    warn_remote_code,
)
from distributed_pt.models.reward import quiet_transformers
from distributed_pt.models.zero import gathered

HEAD_FILE = "head.safetensors"  # a feature-mode export: the head's weights ...
CLASSIFIER_FILE = "classifier.json"  # ... and what it needs: labels, pooling, the backbone (its source and digest)
FEATURES_FORMAT = 1  # bump when the feature cache's layout or what it holds changes


def set_labels(config: Any, labels: list[str]) -> None:
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}


def load_classifier(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, labels: list[str]) -> nn.Module:
    """A K-class model from `model.path` (any HF causal LM or classifier; a head of another shape starts afresh) or
    random-init from `model.preset` / `model.init_config`, with num_labels, id2label and label2id set."""
    kwargs = {"dtype": DTYPES[cfg.dtype], "attn_implementation": attention_implementation(cfg)}
    check_model_source(cfg)
    if cfg.path is not None:
        warn_remote_code(cfg, cfg.path, "model")
        with quiet_transformers():  # a causal LM has no head yet: its LOAD REPORT reads like a fault
            model, info = AutoModelForSequenceClassification.from_pretrained(
                cfg.path, local_files_only=True, trust_remote_code=cfg.trust_remote_code, output_loading_info=True,
                num_labels=len(labels), ignore_mismatched_sizes=True, **kwargs,
            )  # fmt: skip
        fresh = [k for k in [*info.get("missing_keys", []), *info.get("mismatched_keys", [])] if "score" in str(k)]
        if fresh:
            dist.print0(f"model: '{cfg.path}' has no {len(labels)}-class head: 'score' starts from random init")
    else:
        config = init_model_config(cfg, tokenizer)
        config.num_labels = len(labels)
        model = AutoModelForSequenceClassification.from_config(config, dtype=kwargs["dtype"])
    if not isinstance(getattr(model, "score", None), nn.Linear):
        raise ConfigError(f"model: {type(model).__name__} has no linear 'score' head; it cannot be a classifier")
    set_labels(model.config, labels)
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Pooling and the head, called through a Backbone (or its DeepSpeed engine).


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, H) hidden states, (B, T) mask → (B, H): the last real token's state ("last"), or the real tokens'
    mean ("mean")."""
    if how == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    rows = torch.arange(hidden.size(0), device=hidden.device)
    return hidden[rows, last_token_index(attention_mask)]


def pooled_logits(hidden: torch.Tensor, head: nn.Module, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Head function: (B, K) float32 logits of the pooled states (the head runs on B vectors, not B x T)."""
    return head(pool(hidden, attention_mask, pooling)).float()


def pooled_features(hidden: torch.Tensor, head: nn.Module, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Head function: the (B, H) float32 pooled states themselves (feature mode; the head is not used)."""
    return pool(hidden, attention_mask, pooling).float()


def class_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, K) float32 logits of a padded batch through a `Backbone` (or its engine)."""
    head = partial(pooled_logits, attention_mask=attention_mask, pooling=pooling)
    return model(input_ids, attention_mask, head=head)


class ClassifierHead(nn.Module):
    """Feature mode's trainable part: the classifier's ``score`` alone, on cached (B, H) features → (B, K) float32."""

    def __init__(self, score: nn.Linear) -> None:
        super().__init__()
        self.score = nn.Linear(score.in_features, score.out_features, bias=score.bias is not None, dtype=torch.float32)
        self.score.load_state_dict(score.state_dict())  # the same initialisation as the full model's head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.score(features.to(self.score.weight.dtype)).float()


def classification_metrics(confusion: torch.Tensor, labels: list[str], prefix: str = "eval/") -> dict[str, float]:
    """Accuracy, macro-F1 and per-class precision/recall from a (K, K) confusion matrix (rows: true class, columns:
    predicted). A class never predicted (or never present) has precision (recall) 0, as scikit-learn's default."""
    c = confusion.double()
    tp, predicted, actual = c.diag(), c.sum(0), c.sum(1)
    precision = tp / predicted.clamp(min=1)
    recall = tp / actual.clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), 0.0)
    out = {f"{prefix}accuracy": (tp.sum() / c.sum().clamp(min=1)).item(), f"{prefix}macro_f1": f1.mean().item()}
    for i, name in enumerate(labels):
        out[f"{prefix}precision/{name}"] = precision[i].item()
        out[f"{prefix}recall/{name}"] = recall[i].item()
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Feature mode: the frozen backbone's pooled features, computed once.


def backbone_digest(model: nn.Module) -> str:
    """16-hex-char sha256 of the backbone's weights (names, dtypes, shapes and bytes; the head left out)."""
    h = hashlib.sha256()
    for name, p in sorted(model.base_model.named_parameters()):
        t = p.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class FeatureSet:
    """One split's cached features (N, H) float32 and labels (N,) int64, read by index like a tokenized dataset."""

    features: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.features[idx], self.labels[idx]


@torch.no_grad()
def compute_features(model: nn.Module, dataset: Any, pooling: str, pad_id: int, batch_size: int) -> FeatureSet:
    """Pooled features of every `ClassExample` of `dataset`, in order, by the frozen model on this rank's device."""
    backbone, device = Backbone(model).eval(), next(model.parameters()).device
    head = partial(pooled_features, pooling=pooling)
    features, labels = [torch.zeros(0, model.config.hidden_size)], [torch.zeros(0, dtype=torch.long)]
    for start in range(0, len(dataset), batch_size):
        ids, mask, y = collate_classes(dataset.examples(list(range(start, min(start + batch_size, len(dataset))))),
                                       pad_id)  # fmt: skip
        mask = mask.to(device)
        features.append(backbone(ids.to(device), mask, head=partial(head, attention_mask=mask)).cpu())
        labels.append(y)
    return FeatureSet(torch.cat(features), torch.cat(labels))


def cached_features(
    model: nn.Module, splits: dict[str, Any], pooling: str, cache_dir: Path, pad_id: int, batch_size: int
) -> tuple[dict[str, FeatureSet], dict[str, Any]]:
    """The features of every split (name → tokenized dataset), from the cache, or computed by rank 0 while the other
    ranks wait (then saved there). Returns ({split: FeatureSet}, {"path", "hit", "seconds", "backbone"})."""
    from safetensors.torch import load_file

    status, error = None, None
    if dist.is_main():
        try:
            status = ("ok", _build_or_hit(model, splits, pooling, Path(cache_dir), pad_id, batch_size))
        except BaseException as e:
            status, error = ("error", f"{type(e).__name__}: {e}"), e
    kind, info = dist.broadcast_object(status)
    if error is not None:
        raise error
    if kind == "error":
        raise RuntimeError(f"rank 0 failed while computing the features: {info}")
    loaded = {name: load_file(str(Path(info["path"]) / f"{name}.safetensors")) for name in splits}
    return {name: FeatureSet(t["features"], t["labels"]) for name, t in loaded.items()}, info


def features_key(splits: dict[str, Any], pooling: str, digest: str) -> dict[str, Any]:
    """What the feature cache's directory name hashes."""
    data = {name: ds.cache_name for name, ds in splits.items()}
    return {"format": FEATURES_FORMAT, "data": data, "pooling": pooling, "backbone": digest}


def _build_or_hit(
    model: nn.Module, splits: dict[str, Any], pooling: str, cache_dir: Path, pad_id: int, batch_size: int
) -> dict[str, Any]:
    start = time.monotonic()
    digest = backbone_digest(model)
    key = features_key(splits, pooling, digest)
    final = cache_dir / f"features-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]}"
    if (final / "meta.json").is_file():
        if json.loads((final / "meta.json").read_text())["key"] != key:
            raise ConfigError(f"{final}: its meta.json names other inputs than its name hashes; delete the directory")
        dist.print0(f"feature cache hit: {final}")
        return {"path": str(final), "hit": True, "seconds": time.monotonic() - start, "backbone": digest}
    from safetensors.torch import save_file

    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name, ds in splits.items():
            fs = compute_features(model, ds, pooling, pad_id, batch_size)
            save_file({"features": fs.features.contiguous(), "labels": fs.labels}, str(tmp / f"{name}.safetensors"))
        seconds = time.monotonic() - start
        (tmp / "meta.json").write_text(json.dumps({"key": key, "seconds": seconds}, indent=1))
        os.rename(tmp, final)  # whole or absent
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.print0(f"features of {sum(map(len, splits.values()))} rows computed in {seconds:.1f}s -> {final}")
    return {"path": str(final), "hit": False, "seconds": seconds, "backbone": digest}


# ----------------------------------------------------------------------------------------------------------------------
# Feature mode's export: the head alone, and its reload onto the same backbone.


def save_head(head: nn.Module, out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Collective: rank 0 writes `HEAD_FILE` (the head's weights, e.g. ``score.weight`` (K, H)) and `CLASSIFIER_FILE`
    (`meta`: labels, pooling, dtype and the backbone's source and digest) into `out_dir`."""
    from safetensors.torch import save_file

    state = {}
    for name, p in head.named_parameters():
        with gathered([p]):  # (ZeRO-3: every rank gathers, rank 0 keeps)
            state[name] = p.detach().cpu().clone()
    out = Path(out_dir)
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out / HEAD_FILE), metadata={"format": "pt"})
        (out / CLASSIFIER_FILE).write_text(json.dumps(meta, indent=1))
    dist.barrier()
    return out


def attach_head(model: nn.Module, head_dir: str | Path) -> nn.Module:
    """Put a feature-mode head onto its backbone (an HF ``*ForSequenceClassification``): refused (ConfigError) when
    the backbone's weights are not the ones the head was trained on. Sets num_labels, id2label and label2id."""
    from safetensors.torch import load_file

    meta = json.loads((Path(head_dir) / CLASSIFIER_FILE).read_text())
    digest = backbone_digest(model)
    if digest != meta["backbone"]["digest"]:
        raise ConfigError(
            f"{head_dir}: this head was trained on backbone {meta['backbone']['digest']} ({meta['backbone']}); the "
            f"model given is {digest}: its features differ, so the head's predictions would be meaningless"
        )
    state = load_file(str(Path(head_dir) / HEAD_FILE))
    weight = state["score.weight"]
    model.score = nn.Linear(weight.size(1), weight.size(0), bias="score.bias" in state, dtype=weight.dtype)
    model.score.load_state_dict({k.removeprefix("score."): v for k, v in state.items()})
    model.num_labels = len(meta["labels"])
    set_labels(model.config, meta["labels"])
    return model


def load_feature_classifier(head_dir: str | Path, backbone: str | None = None) -> nn.Module:
    """An HF ``*ForSequenceClassification``: the backbone (`backbone`, else the local path the head's metadata names)
    with the feature-mode head of `head_dir` (see `attach_head`)."""
    meta = json.loads((Path(head_dir) / CLASSIFIER_FILE).read_text())
    path = backbone or meta["backbone"]["path"]
    if path is None:
        raise ConfigError(
            f"{head_dir}: the head was trained on a random-init backbone (model.preset / init_config), which is not "
            "saved: build that model and call attach_head"
        )
    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(
            path, local_files_only=True, num_labels=len(meta["labels"]), ignore_mismatched_sizes=True,
            dtype=DTYPES[meta["dtype"]],
        )  # fmt: skip
    return attach_head(model, head_dir)
