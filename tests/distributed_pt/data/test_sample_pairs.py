"""Preference pairs from a policy's own samples, labelled by the demo checker."""

from __future__ import annotations

import json

from distributed_pt.data.demo import is_correct
from distributed_pt.data.sample_pairs import main
from tests.conftest import DEMO


def test_pairs_put_a_correct_answer_over_each_wrong_sample(tmp_path, sft_zero2_run):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join((DEMO / "prompts_eval.jsonl").read_text().splitlines(keepends=True)[:24]))
    out = tmp_path / "pairs.jsonl"
    main([f"--model={sft_zero2_run / 'final'}", f"--prompts={prompts}", f"--out={out}", "--samples=3"])
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert pairs, "a 40-step model gets some answers wrong"
    for p in pairs:
        assert is_correct(p["prompt"], p["chosen"]) and not is_correct(p["prompt"], p["rejected"])
        assert p["kind"] == "policy_sample"


def test_pipeline_summary_table():
    from distributed_pt.pipeline import summary_table

    sft = {"steps": 10, "before": {"eval/exact_match": 0.0, "eval/loss": 4.0}, "after": {"eval/exact_match": 0.5}}
    table = summary_table({"sft": (sft, 12.3)})
    assert "| sft | held-out exact match | 0.000 | 0.500 |" in table and "| sft | 10 | 12 s |" in table
    assert "held-out loss" not in table  # no 'after' value: no row
