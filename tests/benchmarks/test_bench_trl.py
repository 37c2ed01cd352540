"""benchmarks/bench_trl.py end to end on the demo model (a few steps), where TRL (the bench extra) is installed."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("trl")


@pytest.mark.slow
def test_both_sides_train_the_same_saved_model_and_are_recorded(tmp_path):
    from benchmarks import bench_trl

    bench_trl.main(
        ["--cpu", "--sizes", "demo", "--steps", "6", "--log-every", "2", "--repeats", "1", "--out", str(tmp_path)]
    )
    records = json.loads((tmp_path / "bench_trl_cpu.json").read_text())
    got = {(r["provider"], r["metric"]): r["value"] for r in records}
    metrics = ("tokens_per_s", "peak_mem")
    ratios = {("ours/trl", f"{m} ratio") for m in metrics}
    assert set(got) == {(p, m) for p in ("ours", "trl") for m in metrics} | ratios
    assert all(v > 0 for v in got.values())
    for m in metrics:
        assert got[("ours/trl", f"{m} ratio")] == pytest.approx(got[("ours", m)] / got[("trl", m)])
    assert (tmp_path / "bench_trl_cpu.md").is_file()
