"""benchmarks/bench_trl_grpo.py end to end on the demo model, a few cycles (needs TRL: the bench extra)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("trl")


@pytest.mark.slow
def test_both_grpo_sides_run_the_same_saved_model_and_are_recorded(tmp_path, monkeypatch):
    from benchmarks import bench_trl_grpo

    small = {"prompts": 4, "generations": 4, "new_tokens": 8, "micro_batch_size": 8, "lr": 5e-6}  # seconds, not minutes
    monkeypatch.setattr(bench_trl_grpo, "SETTINGS", small)
    path = bench_trl_grpo.main(["--cpu", "--sizes", "demo", "--steps", "4", "--repeats", "1", "--out", str(tmp_path)])
    got = {(r["provider"], r["metric"]): r["value"] for r in json.loads(path.read_text())}
    for metric in bench_trl_grpo.UNITS:
        assert got["ours", metric] > 0 and got["trl", metric] > 0, metric
        assert got["ours/trl", f"{metric} ratio"] == pytest.approx(got["ours", metric] / got["trl", metric])
    for side in ("ours", "trl"):  # random weights: completions run long, never past the limit
        assert 1 <= got[side, "completion_length"] <= bench_trl_grpo.SETTINGS["new_tokens"]
