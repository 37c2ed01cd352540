"""bench_sequence end to end at a short length: both sequence-parallel sizes run, the shards' losses add up to the
whole sequence's, and each rank of SP 2 keeps about half of SP 1's activations."""

from __future__ import annotations

import json

from benchmarks import bench_sequence


def test_sp2_keeps_half_the_activations_per_rank(tmp_path, monkeypatch):
    losses = {}
    run_case = bench_sequence.run_case

    def recording(seq, sp, work):
        ranks = run_case(seq, sp, work)
        losses[sp] = sum(r["loss"] for r in ranks)
        return ranks

    monkeypatch.setattr(bench_sequence, "run_case", recording)
    path = bench_sequence.main(["--seq", "1024", "--out", str(tmp_path)])
    records = {(r["sp"], r["metric"]): r["value"] for r in json.loads(path.read_text())}
    assert abs(losses[2] - losses[1]) < 1e-4 * abs(losses[1])  # the same step, computed on shards
    assert 0.45 < records[(2, "saved_bytes")] / records[(1, "saved_bytes")] < 0.6
    assert 0.9 < records[(1, "planned/saved")] < 1.3  # the planner's stated error on this model
    assert (tmp_path / "bench_sequence_cpu.md").is_file() and (tmp_path / "bench_sequence_cpu.png").is_file()
