"""bench_packing: the skewed dataset (long-tailed, seeded, exact token counts), the batch plan, and a smoke run of the
whole bench (two 1-rank launcher runs of 4 steps and the cold/warm cache timing on 2000 rows: ~30 s on 2 cores)."""

from __future__ import annotations

import json

import numpy as np

from benchmarks import bench_packing as bp
from distributed_pt.config import ModelConfig
from distributed_pt.data.io import Row
from distributed_pt.data.sft import encode_row
from distributed_pt.models.loading import load_tokenizer


def test_lengths_are_long_tailed_seeded_and_bounded():
    lengths = bp.row_lengths(20_000, 256, seed=0)
    assert np.array_equal(lengths, bp.row_lengths(20_000, 256, seed=0))
    assert not np.array_equal(lengths, bp.row_lengths(20_000, 256, seed=1))
    assert lengths.min() >= bp.MIN_TOKENS and lengths.max() == 256  # the tail reaches max_length (and is cut there)
    s = bp.length_stats(lengths, 256)
    # lognormal(median 0.08 x 256 = 20.5, sigma 1): mean = median x e^0.5, p90 = median x e^1.28
    assert 19 <= s["len_p50"] <= 22 and 31 <= s["len_mean"] <= 36 and 68 <= s["len_p90"] <= 80
    assert s["len_mean"] > 1.5 * s["len_p50"] and s["len_p99"] > 8 * s["len_p50"]  # most rows short, a long tail
    assert 0 < s["at_max"] < 0.02


def test_rows_tokenize_to_exactly_their_drawn_lengths(tmp_path):
    tok = load_tokenizer(ModelConfig())
    words = bp.vocab_words(tok)
    assert len(words) > 40 and all(len(tok(w, add_special_tokens=False)["input_ids"]) == 1 for w in words)
    lengths = bp.row_lengths(300, 128, seed=3)
    path = tmp_path / "rows.jsonl"
    bp.write_rows(path, lengths, words, seed=3)
    text = path.read_text()
    bp.write_rows(tmp_path / "again.jsonl", lengths, words, seed=3)
    assert (tmp_path / "again.jsonl").read_text() == text  # seeded
    rows = [json.loads(line) for line in text.splitlines()]
    assert len(rows) == 300 and all(set(r) == {"prompt", "response"} and r["prompt"] and r["response"] for r in rows)
    ids = [encode_row(tok, Row(r, f"rows.jsonl:{i + 1}"))[0] for i, r in enumerate(rows)]
    assert [len(x) for x in ids] == lengths.tolist()
    assert tok.unk_token_id not in {t for x in ids for t in x}


def test_plan_counts_real_tokens_and_samples_per_step():
    lengths = np.array([3, 5, 7, 9])
    # 1 rank, micro batch 4: one step holds every sample
    assert bp.plan_stats(lengths, None, 4, 1, 0, 1) == {"tokens_per_step": 24, "samples_per_step": 4}
    # packed rows (0, 1) and (2, 3), 2 ranks x 1 row: each step holds both rows
    assert bp.plan_stats(lengths, [[0, 1], [2, 3]], 1, 2, 0, 3) == {"tokens_per_step": 24, "samples_per_step": 4}


def test_smoke_run_writes_the_records_and_views(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # main() sets it for the CPU presets; restored afterwards
    path = bp.main(["--smoke", f"--out={tmp_path / 'out'}", f"--work-dir={tmp_path / 'work'}"])
    records = json.loads(path.read_text())
    assert path.name == "bench_packing_smoke.json"
    for r in records:
        assert {"bench", "case", "provider", "metric", "value", "unit", "device", "git_sha", "date"} <= set(r)
    val = {(r["part"], r["provider"], r["metric"]): r["value"] for r in records if r["part"] != "lengths"}
    assert all(r.get("status", "ok") == "ok" for r in records), [r.get("note") for r in records]
    for provider in ("padding", "packing"):
        assert val[("train", provider, "tokens_per_s")] > 0 and val[("train", provider, "final_loss")] > 0
        assert val[("train", provider, "time_to_first_step")] < val[("train", provider, "wall_time")]
    assert val[("train", "packing", "padding_fraction")] < val[("train", "padding", "padding_fraction")]
    assert val[("train", "packing", "speedup")] > 0
    assert val[("cache", "data", "warm_load_s")] < val[("cache", "data", "cold_tokenize_s")]
    assert val[("cache", "data", "warm_start_s")] >= val[("cache", "data", "pack_s")]
    lengths = {r["rows"]: r for r in records if r["part"] == "lengths" and r["metric"] == "len_max"}
    assert set(lengths) == {400, 2000}  # the training set and the cache timing's rows
    md = path.with_suffix(".md").read_text()
    assert "| tokens_per_s (tok/s) |" in md and "Goal packing >= 2x" in md and "Equal real tokens per step" in md
    assert path.with_suffix(".png").stat().st_size > 1000
    bp.main([f"--render={path}"])  # the views again, from the JSON alone
    assert path.with_suffix(".md").read_text() == md
