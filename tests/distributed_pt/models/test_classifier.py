"""The classifier's pooling, head, metrics, feature cache and feature-mode export, in one process on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from distributed_pt.config import ConfigError, DataConfig, ModelConfig
from distributed_pt.data.classify import collate_classes, load_classify_data
from distributed_pt.data.collate import pad
from distributed_pt.models.classifier import (
    CLASSIFIER_FILE,
    ClassifierHead,
    attach_head,
    backbone_digest,
    cached_features,
    class_logits,
    classification_metrics,
    load_classifier,
    load_feature_classifier,
    pool,
    save_head,
)
from distributed_pt.models.heads import Backbone
from distributed_pt.models.loading import load_tokenizer

LABELS = ["add", "count", "reverse", "sort"]
TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig())


def tiny_classifier(tokenizer, seed: int = 0, path: str | None = None):
    torch.manual_seed(seed)
    cfg = ModelConfig(path=path, init_config=None if path else TINY, dtype="fp32", attn_implementation="eager")
    return load_classifier(cfg, tokenizer, LABELS).eval()


def test_pooling_reads_the_last_real_token_under_left_and_right_padding():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    assert torch.equal(pool(hidden, right, "last"), torch.stack([hidden[0, 2], hidden[1, 1]]))
    assert torch.equal(pool(hidden, left, "last"), torch.stack([hidden[0, 3], hidden[1, 3]]))
    assert torch.allclose(pool(hidden, right, "mean"), torch.stack([hidden[0, :3].mean(0), hidden[1, :2].mean(0)]))
    assert torch.allclose(pool(hidden, left, "mean"), torch.stack([hidden[0, 1:].mean(0), hidden[1, 2:].mean(0)]))


@pytest.mark.parametrize("left", [False, True])
def test_head_reads_what_the_hf_class_reads(tokenizer, left):
    """Our last-token logits equal AutoModelForSequenceClassification's own forward, left or right padded, and do not
    depend on the padding (what makes the export predict with transformers alone)."""
    model = tiny_classifier(tokenizer)
    assert model.config.id2label == dict(enumerate(LABELS)) and model.config.label2id["sort"] == 3
    seqs = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in ("cat dog sun", "3 4 + 1 9", "a b")]
    ids, mask = pad(seqs, tokenizer.pad_token_id, left=left)
    with torch.no_grad():
        ours = class_logits(Backbone(model), ids, mask, "last")
        theirs = model(input_ids=ids, attention_mask=mask).logits
        one = [class_logits(Backbone(model), torch.tensor([s]), torch.ones(1, len(s)), "last") for s in seqs]
        alone = torch.cat(one)
    torch.testing.assert_close(ours, theirs.float())
    torch.testing.assert_close(ours, alone, rtol=1e-4, atol=1e-5)


def test_metrics_by_hand():
    # rows: true class, columns: predicted. class 0: 3 right, 1 called 1; class 1: 1 right, 1 called 0; class 2: none.
    confusion = torch.tensor([[3, 1, 0], [1, 1, 0], [0, 0, 0]])
    m = classification_metrics(confusion, ["a", "b", "c"])
    assert m["eval/accuracy"] == pytest.approx(4 / 6)
    assert m["eval/precision/a"] == pytest.approx(3 / 4) and m["eval/recall/a"] == pytest.approx(3 / 4)
    assert m["eval/precision/b"] == pytest.approx(1 / 2) and m["eval/recall/b"] == pytest.approx(1 / 2)
    assert m["eval/precision/c"] == 0 and m["eval/recall/c"] == 0
    assert m["eval/macro_f1"] == pytest.approx((3 / 4 + 1 / 2 + 0) / 3)


@pytest.fixture(scope="module")
def splits(tokenizer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("classify_data")
    rows = [("cat dog", "reverse"), ("3 + 4", "add"), ("a b a", "count"), ("d c", "sort"), ("sun moon", "reverse")]
    (tmp / "train.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    (tmp / "eval.jsonl").write_text(json.dumps({"text": "5 + 1", "label": "add"}) + "\n")
    data = DataConfig(train_files=[str(tmp / "train.jsonl")], eval_files=[str(tmp / "eval.jsonl")], max_length=16)
    train, evals, _ = load_classify_data(tokenizer, data, 0, LABELS, tmp / "cache")
    return {"train": train, "eval": evals}


def test_feature_cache_hit_and_a_changed_backbone_never_reads_it(tokenizer, splits, tmp_path):
    model = tiny_classifier(tokenizer)
    first, info = cached_features(model, splits, "last", tmp_path, tokenizer.pad_token_id, 2)
    assert not info["hit"] and first["train"].features.shape == (5, 32) and first["eval"].labels.tolist() == [0]
    ids, mask, labels = collate_classes(splits["train"].examples(list(range(5))), tokenizer.pad_token_id)
    with torch.no_grad():  # the cached features are the backbone's pooled states
        expected = Backbone(model)(ids, mask, head=lambda h, _: pool(h, mask, "last"))
    torch.testing.assert_close(first["train"].features, expected)
    assert first["train"].labels.tolist() == labels.tolist()

    again, hit = cached_features(model, splits, "last", tmp_path, tokenizer.pad_token_id, 2)
    assert hit["hit"] and hit["path"] == info["path"]
    torch.testing.assert_close(again["train"].features, first["train"].features)

    with torch.no_grad():  # one weight of the backbone changes: a new key, features computed afresh
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 0.5
    changed, miss = cached_features(model, splits, "last", tmp_path, tokenizer.pad_token_id, 2)
    assert not miss["hit"] and miss["path"] != info["path"] and miss["backbone"] != info["backbone"]
    assert not torch.allclose(changed["train"].features, first["train"].features)
    _, mean = cached_features(model, splits, "mean", tmp_path, tokenizer.pad_token_id, 2)
    assert not mean["hit"]  # the pooling is part of the key too


def test_feature_head_export_loads_onto_its_backbone_only(tokenizer, splits, tmp_path):
    torch.manual_seed(0)
    lm = AutoModelForSequenceClassification.from_config(load_classifier(
        ModelConfig(init_config=TINY, dtype="fp32"), tokenizer, LABELS).config)  # fmt: skip
    lm.save_pretrained(tmp_path / "backbone")  # a local backbone directory
    model = tiny_classifier(tokenizer, path=str(tmp_path / "backbone"))
    features, info = cached_features(model, splits, "last", tmp_path / "cache", tokenizer.pad_token_id, 4)
    head = ClassifierHead(model.score)
    with torch.no_grad():
        head.score.weight.normal_()  # a "trained" head, unlike the backbone's random one
        expected = head(features["train"].features)
    meta = {"mode": "feature", "labels": LABELS, "pooling": "last", "dtype": "fp32",
            "backbone": {"path": str(tmp_path / "backbone"), "digest": info["backbone"]}}  # fmt: skip
    save_head(head, tmp_path / "final", meta)
    assert (tmp_path / "final" / "head.safetensors").stat().st_size < 4 * 32 * 4 + 1000  # K x H floats and a header
    saved = json.loads((tmp_path / "final" / CLASSIFIER_FILE).read_text())
    assert saved["backbone"]["digest"] == backbone_digest(model)

    loaded = load_feature_classifier(tmp_path / "final").eval()
    assert loaded.config.id2label == dict(enumerate(LABELS))
    ids, mask, _ = collate_classes(splits["train"].examples(list(range(5))), tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, expected, rtol=1e-4, atol=1e-5)

    other = tiny_classifier(tokenizer, seed=1)  # another backbone: refused
    with pytest.raises(ConfigError, match="trained on backbone"):
        attach_head(other, tmp_path / "final")
