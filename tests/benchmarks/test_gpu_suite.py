"""benchmarks/gpu_suite.sh: valid bash, and its --dry-run names every step without running anything."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"


def test_gpu_suite_is_valid_bash():
    subprocess.run(["bash", "-n", str(SUITE)], check=True)


def test_gpu_suite_dry_run_names_each_bench_and_the_gpu_tests(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out"), "TAG": "h200"}
    proc = subprocess.run(
        ["bash", str(SUITE), "--dry-run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "--target /tmp/site .whl/" in out
    assert "-m pytest -q -m gpu" in out and "tests/kernels/test_lora_matmul.py" in out
    for bench in ("bench_lora_matmul", "bench_cross_entropy", "bench_memory"):
        assert f"-m benchmarks.{bench}" in out
        assert f"{bench}_h200" in out  # records named by device
    memory = next(line for line in out.splitlines() if "benchmarks.bench_memory" in line)
    for flag in ("--sizes 1b\\,8b", "--seq 2048", "--zero 2", "--checkpointing on", "full\\,lora\\,lora_fused\\,peft"):
        assert flag in memory
    assert "launch/single_node.sh configs/sft_tiny.yaml logging.wandb_mode=disabled" in out
    assert "demo_sft_h200_summary.json" in out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
