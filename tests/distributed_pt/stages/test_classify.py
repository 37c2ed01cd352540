"""The classify stage end to end, 2 CPU ranks through the `deepspeed` launcher: each mode learns the demo routing task
above chance from one config, and each export predicts with transformers alone."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from distributed_pt.config import DataConfig, ModelConfig
from distributed_pt.data.classify import collate_classes, load_classify_data
from distributed_pt.models.classifier import class_logits, load_feature_classifier
from distributed_pt.models.heads import Backbone
from distributed_pt.models.loading import build_config, load_tokenizer
from tests.conftest import DEMO, ROOT, read_metrics, run_launcher

CONFIG = ROOT / "configs" / "classify_tiny.yaml"
STEPS = 60
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}  # fmt: skip
MODES = {  # mode: (ZeRO config, learning rate)
    "feature": ("zero2", 2e-2),
    "lora": ("zero2", 5e-3),
    "full": ("zero3_partitioned", 2e-3),
}


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    """A local random-init causal LM directory (with the demo tokenizer): the backbone every mode starts from."""
    out = tmp_path_factory.mktemp("backbone")
    tok = load_tokenizer(ModelConfig())
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(build_config(TINY, tok)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=list(MODES))
def run(request, backbone, tmp_path_factory, zero3_partitioned):
    mode = request.param
    zero, lr = MODES[mode]
    ds = zero3_partitioned if zero == "zero3_partitioned" else f"configs/deepspeed/{zero}.json"
    out = tmp_path_factory.mktemp(f"classify_{mode}")
    overrides = [
        f"classify.mode={mode}", f"model.path={backbone}", "model.init_config=null", f"output_dir={out}",
        f"train.max_steps={STEPS}", f"optim.lr={lr}", "train.log_every=10", f"deepspeed.config={ds}",
        "logging.wandb_mode=disabled", "logging.progress_bar=false",
    ]  # fmt: skip
    proc = run_launcher(CONFIG, overrides)
    return mode, out, proc


def eval_texts() -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in (DEMO / "classify_eval.jsonl").read_text().splitlines()]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def test_mode_learns_above_chance_and_exports(run, backbone):
    mode, out, proc = run
    evals = [m for m in read_metrics(out) if "eval/accuracy" in m]
    before, after = evals[0], evals[-1]
    print(f"{mode}: held-out accuracy {before['eval/accuracy']:.3f} -> {after['eval/accuracy']:.3f}, "
          f"macro-F1 {after['eval/macro_f1']:.3f}")  # fmt: skip
    assert after["eval/accuracy"] >= 0.6 and after["eval/accuracy"] > before["eval/accuracy"] + 0.2  # chance: 0.25
    summary = json.loads((out / "summary.json").read_text())
    confusion = torch.tensor(summary["confusion"])
    assert summary["classes"] == ["add", "count", "reverse", "sort"] and confusion.sum() == 400
    assert confusion.trace() / 400 == pytest.approx(summary["after"]["eval/accuracy"])
    trainable, total = summary["parameters"]["trainable"], summary["parameters"]["total"]
    assert {"feature": trainable == 4 * 64, "lora": 4 * 64 < trainable < total / 2, "full": trainable == total}[mode]

    # transformers alone: the exported model (feature mode: the backbone + the small head) predicts the eval rows as
    # the final eval did, and gives our model's logits.
    final = out / "final"
    if mode == "feature":
        assert "features of 2400 rows computed" in proc.stdout  # once, by rank 0 (test_classifier: the cache hit)
        assert sorted(p.name for p in final.iterdir()) == ["classifier.json", "head.safetensors"]
        model, tok = load_feature_classifier(final).eval(), AutoTokenizer.from_pretrained(backbone)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(final).eval()
        tok = AutoTokenizer.from_pretrained(final)
    texts, labels = eval_texts()
    enc = tok([t + tok.eos_token for t in texts], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    predicted = [model.config.id2label[i] for i in logits.argmax(-1).tolist()]
    accuracy = sum(p == y for p, y in zip(predicted, labels, strict=True)) / len(labels)
    assert accuracy == pytest.approx(after["eval/accuracy"], abs=0.006)  # (a near tie may flip between kernels)

    data = DataConfig(train_files=[str(DEMO / "classify_eval.jsonl")], max_length=32)
    rows, _, _ = load_classify_data(tok, data, 0, summary["classes"], out / "check_cache")
    ids, mask, _ = collate_classes(rows.examples(list(range(8))), tok.pad_token_id)
    with torch.no_grad():
        ours = class_logits(Backbone(model), ids, mask, "last")
    torch.testing.assert_close(ours, logits[:8].float(), rtol=1e-4, atol=1e-4)
