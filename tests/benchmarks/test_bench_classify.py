"""bench_classify: a smoke run of the whole bench (one feature-mode classify run of 2 steps on 1 rank, ~15 s) writes
measured records, the table and the plot; what a task stores is counted per mode."""

from __future__ import annotations

import json

from benchmarks import bench_classify as bc


def test_task_bytes_counts_what_a_task_adds_to_the_backbone(tmp_path):
    (tmp_path / "adapter").mkdir()
    for name, size in {"model.safetensors": 1000, "config.json": 10, "classifier.json": 5, "tokenizer.json": 300,
                       "tokenizer_config.json": 30, "adapter/adapter_model.safetensors": 100}.items():  # fmt: skip
        (tmp_path / name).write_bytes(b"x" * size)
    assert bc.task_bytes(tmp_path, "full") == 1015
    assert bc.task_bytes(tmp_path, "lora") == 105


def test_smoke_run_writes_the_records_and_views(tmp_path):
    path = bc.main(["--smoke", f"--out={tmp_path / 'out'}", f"--work-dir={tmp_path / 'work'}"])
    records = json.loads(path.read_text())
    assert path.name == "bench_classify_smoke.json"
    val = {(r["provider"], r["metric"]): r["value"] for r in records}
    assert {m for _, m in val} == {m for m, _ in bc.METRICS}
    assert val[("feature", "trainable_params")] == 4 * 128  # 4 classes x the config's hidden size
    head = (tmp_path / "work" / "random_feature" / "final" / "head.safetensors").stat().st_size
    assert head < val[("feature", "bytes_per_task")] < head + 2000
    assert 0 <= val[("feature", "accuracy")] <= 1 and val[("feature", "wall_s")] > val[("feature", "train_s")] > 0
    assert all({"device", "git_sha", "date", "case", "unit"} <= set(r) for r in records)
    assert "## Side by side" in path.with_suffix(".md").read_text()
    assert path.with_suffix(".png").stat().st_size > 1000
