"""benchmarks/bench_rollout.py end to end on the demo shape (a short rollout), where vLLM is installed (.ci/vllm)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")


@pytest.mark.vllm
@pytest.mark.slow
def test_both_engines_roll_out_and_are_recorded(tmp_path):
    from benchmarks import bench_rollout

    bench_rollout.main(["--cpu", "--sizes", "demo", "--prompts", "8", "--new-tokens", "8", "--repeats", "1",
                        "--out", str(tmp_path)])  # fmt: skip
    records = json.loads((tmp_path / "bench_rollout_cpu.json").read_text())
    got = {(r["provider"], r["metric"]): r["value"] for r in records}
    metrics = ("gen_tokens_per_s", "rollout_s", "sync_s", "sync_share")
    ratios = {("vllm/hf", f"{m} ratio") for m in ("gen_tokens_per_s", "rollout_s")}
    assert set(got) == {(p, m) for p in ("hf", "vllm") for m in metrics} | ratios
    assert got[("hf", "sync_s")] == 0 and got[("vllm", "sync_s")] > 0  # the actor stepped: vLLM was pushed weights
    assert all(got[(p, m)] > 0 for p in ("hf", "vllm") for m in ("gen_tokens_per_s", "rollout_s"))
    ratio = got[("vllm/hf", "gen_tokens_per_s ratio")]
    assert ratio == pytest.approx(got[("vllm", "gen_tokens_per_s")] / got[("hf", "gen_tokens_per_s")])
    assert (tmp_path / "bench_rollout_cpu.md").is_file()
