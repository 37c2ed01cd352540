"""Shared test helpers: a tiny stage config and a runner for the real `deepspeed` launcher (2 CPU ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "distributed_pt" / "assets" / "demo"

# A tiny model and short run: seconds per stage on 2 CPU cores.
TINY_SFT = [
    "model.init_config={model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
    "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 128}",
    "model.dtype=fp32",
    "optim.lr=6e-3",
    "optim.warmup_steps=2",
    "train.micro_batch_size=8",
    "train.log_every=1",
    "eval.num_generate=16",
    "logging.wandb_mode=disabled",
    "logging.progress_bar=false",
]


def env() -> dict[str, str]:
    e = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    e["PYTHONPATH"] = f"{ROOT}{os.pathsep}{e.get('PYTHONPATH', '')}"
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def free_port() -> int:
    from distributed_pt.dist import free_port as fp

    return fp()


def launch_cmd(config: str | Path, overrides: list[str], nproc: int = 2) -> list[str]:
    """The `deepspeed` launcher command for `nproc` CPU ranks (python -m so the venv's deepspeed is used)."""
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc)]
    return [*launcher, "--master_port", str(free_port()), "--module", "distributed_pt.train", str(config), *overrides]


def run_launcher(config: str | Path, overrides: list[str], nproc: int = 2, timeout: int = 300, check: bool = True):
    proc = subprocess.run(
        launch_cmd(config, overrides, nproc), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"launcher exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def read_metrics(output_dir: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(output_dir: str | Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(output_dir) if "loss" in m}


@pytest.fixture(scope="session")
def zero3_partitioned(tmp_path_factory) -> Path:
    """ZeRO-3 with every parameter partitioned (the default persistence threshold would keep a tiny model whole)."""
    conf = json.loads((ROOT / "configs/deepspeed/zero3.json").read_text())
    conf["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path_factory.mktemp("ds") / "zero3_partitioned.json"
    path.write_text(json.dumps(conf))
    return path


SFT_CONFIG = ROOT / "configs" / "sft_tiny.yaml"
SFT_STEPS = 40


@pytest.fixture(scope="session")
def sft_zero2_run(tmp_path_factory) -> Path:
    """One 2-rank ZeRO-2 SFT run of the tiny model, shared by the SFT tests and the stages that start from SFT."""
    out = tmp_path_factory.mktemp("sft_zero2")
    overrides = [*TINY_SFT, f"output_dir={out}", f"train.max_steps={SFT_STEPS}", "checkpoint.save_every=20"]
    run_launcher(SFT_CONFIG, [*overrides, "deepspeed.config=configs/deepspeed/zero2.json"])
    return out


RM_CONFIG = ROOT / "configs" / "rm_tiny.yaml"
RM_STEPS = 150


@pytest.fixture(scope="session")
def rm_zero2_run(tmp_path_factory, sft_zero2_run) -> Path:
    """A 2-rank ZeRO-2 reward model trained from `sft_zero2_run`, shared by the RM and PPO tests."""
    out = tmp_path_factory.mktemp("rm_zero2")
    overrides = [
        f"model.path={sft_zero2_run / 'final'}", f"output_dir={out}", f"train.max_steps={RM_STEPS}",
        f"data.train_files=[{DEMO / 'pref_train.jsonl'}]",
        "train.log_every=10", "train.eval_every=0", "optim.lr=2e-3", "logging.wandb_mode=disabled",
        "logging.progress_bar=false", "deepspeed.config=configs/deepspeed/zero2.json", "checkpoint.save_every=0",
    ]  # fmt: skip
    run_launcher(RM_CONFIG, overrides)
    return out


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
