"""DPO end to end on 2 CPU ranks through the `deepspeed` launcher: the SFT output as the policy's start, the bundled
preference pairs; the three kinds of reference (frozen copy, precomputed, LoRA adapters off); resume; export."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from distributed_pt.rl.reference import precomputed
from tests.conftest import DEMO, ROOT, read_metrics, run_launcher

CONFIG = ROOT / "configs" / "dpo_tiny.yaml"
STEPS = 12
KEYS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen",
        "logps/rejected", "nll", "tokens_per_s", "grad_norm"]  # fmt: skip


def _overrides(sft: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.path={sft / 'final'}", f"output_dir={out}", f"train.max_steps={STEPS}", "train.micro_batch_size=8",
        f"data.train_files=[{DEMO / 'pref_train.jsonl'}]", f"data.eval_files=[{DEMO / 'pref_eval.jsonl'}]",
        f"dpo.eval_prompts=[{DEMO / 'prompts_eval.jsonl'}]", "eval.num_generate=16", "train.log_every=1",
        "train.eval_every=0", "checkpoint.save_every=6", "optim.lr=1e-3", "optim.warmup_steps=0", "dpo.sft_coef=0",
        "logging.wandb_mode=disabled", "logging.progress_bar=false", *extra,
    ]  # fmt: skip


def _steps(out: Path) -> dict[int, dict]:
    return {m["step"]: m for m in read_metrics(out) if "loss" in m}


@pytest.fixture(scope="module")
def dpo_zero2_run(tmp_path_factory, sft_zero2_run) -> Path:
    out = tmp_path_factory.mktemp("dpo_zero2")
    args = _overrides(sft_zero2_run, out, "deepspeed.config=configs/deepspeed/zero2.json", "dpo.offload_reference=true")
    proc = run_launcher(CONFIG, args)
    assert "reference: frozen copy (ZeRO-3, parameters offloaded to CPU)" in proc.stdout
    return out


def test_zero2_learns_the_preferences_and_exports(dpo_zero2_run):
    steps = _steps(dpo_zero2_run)
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert all(k in m for m in steps.values() for k in KEYS)
    # Step 1 starts at the reference: loss log 2, zero implicit rewards.
    assert steps[1]["loss"] == pytest.approx(0.6931, abs=1e-3) and steps[1]["rewards/margin"] == pytest.approx(0.0)
    assert sum(steps[s]["loss"] for s in (10, 11, 12)) < sum(steps[s]["loss"] for s in (1, 2, 3))
    evals = [m for m in read_metrics(dpo_zero2_run) if "eval/rewards/accuracy" in m]
    before, after = evals[0], evals[-1]
    print(f"eval pair accuracy {before['eval/rewards/accuracy']:.3f} -> {after['eval/rewards/accuracy']:.3f}")
    assert after["eval/rewards/accuracy"] > 0.6 and after["eval/loss"] < before["eval/loss"]
    assert "eval/exact_match" in after

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dpo_zero2_run / "final")
    assert sum(p.numel() for p in model.parameters()) > 0


def test_precomputed_reference_gives_the_live_references_run(tmp_path, dpo_zero2_run, sft_zero2_run):
    """The same run with reference log-probs precomputed before training: every step's loss and rewards equal the
    run's with a frozen copy (offloaded), and a second start reads the cache instead of computing."""
    args = _overrides(
        sft_zero2_run, tmp_path / "run", "dpo.precompute_reference=true", "checkpoint.save_every=0",
        f"data.cache_dir={tmp_path / 'cache'}", "deepspeed.config=configs/deepspeed/zero2.json",
    )  # fmt: skip
    proc = run_launcher(CONFIG, args)
    assert "reference: precomputed" in proc.stdout and "computing the rest" in proc.stdout
    live, pre = _steps(dpo_zero2_run), _steps(tmp_path / "run")
    for step in range(1, STEPS + 1):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy"):
            assert pre[step][key] == pytest.approx(live[step][key], rel=1e-4, abs=1e-6), (step, key)

    shutil.rmtree(tmp_path / "run")
    proc = run_launcher(CONFIG, [*args, "train.max_steps=1", "eval.num_generate=0"])
    assert "reference log-probs: cache hit" in proc.stdout and "computing the rest" not in proc.stdout


def test_resume_matches_the_uninterrupted_run(tmp_path, dpo_zero2_run, sft_zero2_run):
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(dpo_zero2_run / "checkpoints" / "step_6", out / "checkpoints" / "step_6")
    (out / "checkpoints" / "latest").write_text("step_6")
    args = _overrides(sft_zero2_run, out, "deepspeed.config=configs/deepspeed/zero2.json", "dpo.offload_reference=true")
    run_launcher(CONFIG, args)
    resumed, reference = _steps(out), _steps(dpo_zero2_run)
    assert sorted(resumed) == list(range(7, STEPS + 1))
    for step in resumed:
        for key in ("loss", "rewards/margin", "logps/chosen"):
            assert resumed[step][key] == pytest.approx(reference[step][key], rel=1e-4, abs=1e-6), (step, key)


def test_zero3_with_lora_reference_as_adapters_off(tmp_path, sft_zero2_run, zero3_partitioned):
    overrides = _overrides(
        sft_zero2_run, tmp_path, f"deepspeed.config={zero3_partitioned}", "lora.enabled=true", "lora.r=4",
        "train.max_steps=6", "checkpoint.save_every=0", "dpo.sft_coef=0.5",
    )  # fmt: skip
    proc = run_launcher(CONFIG, overrides)
    assert "reference: the policy with LoRA adapters off" in proc.stdout
    steps = _steps(tmp_path)
    assert sorted(steps) == list(range(1, 7))
    assert steps[1]["rewards/margin"] == pytest.approx(0.0, abs=1e-6)  # B = 0: the adapters start as a no-op
    assert steps[6]["rewards/margin"] > 0 and steps[6]["loss"] < steps[1]["loss"]
    adapter = tmp_path / "final" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(sft_zero2_run / "final")
    assert isinstance(PeftModel.from_pretrained(base, adapter), PeftModel)


def test_packed_pairs_train_with_a_precomputed_reference(tmp_path, sft_zero2_run):
    """Whole pairs packed into rows of max_length tokens, the reference precomputed per pair and looked up through the
    packed rows: the first step starts at the reference (loss log 2, margin 0) and the loss falls."""
    overrides = _overrides(
        sft_zero2_run, tmp_path, "data.packing=true", "dpo.precompute_reference=true", "checkpoint.save_every=0",
        "eval.num_generate=0", "deepspeed.config=configs/deepspeed/zero2.json",
    )  # fmt: skip
    proc = run_launcher(CONFIG, overrides)
    assert "packing:" in proc.stdout
    steps = _steps(tmp_path)
    # the packed forward gives the unpacked, precomputed log-probs to float rounding
    assert steps[1]["loss"] == pytest.approx(0.6931, abs=1e-3) and abs(steps[1]["rewards/margin"]) < 1e-5
    assert sum(steps[s]["loss"] for s in (10, 11, 12)) < sum(steps[s]["loss"] for s in (1, 2, 3))
    assert steps[1]["padding_fraction"] < 0.2  # rows of several pairs, little padding


def test_simpo_needs_no_reference(tmp_path, sft_zero2_run):
    overrides = _overrides(
        sft_zero2_run, tmp_path, "dpo.loss_type=simpo", "dpo.beta=2.0", "dpo.gamma=0.5", "train.max_steps=4",
        "checkpoint.save_every=0", "eval.num_generate=0", "deepspeed.config=configs/deepspeed/zero2.json",
    )  # fmt: skip
    proc = run_launcher(CONFIG, overrides)
    assert "reference: none (simpo is reference-free)" in proc.stdout
    steps = _steps(tmp_path)
    # SimPO's reward is beta x the mean log-prob per response token
    assert all(m["rewards/chosen"] < 0 and m["rewards/margin"] != 0 for m in steps.values())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dpo.beta=0", "dpo.beta must be > 0"),
        ("dpo.gamma=1.0", "dpo.gamma .* applies to loss_type simpo"),
        ("dpo.label_smoothing=0.1 dpo.loss_type=ipo", "dpo.label_smoothing applies to"),
        ("data.truncation=left", "data.truncation: DPO cuts a long pair's prompt first"),
    ],
)
def test_check_config_names_the_key(override, message):
    from distributed_pt.config import ConfigError, load_config
    from distributed_pt.stages.dpo import check_config

    with pytest.raises(ConfigError, match=message):
        check_config(load_config(CONFIG, override.split()))


def test_precomputed_pass_resumes_at_the_missing_chunks(tmp_path):
    """One process: a table computed in chunks; a chunk deleted (as by a kill) is the only one computed again."""
    calls: list[list[int]] = []

    def logps(indices: list[int]) -> torch.Tensor:
        calls.append(list(indices))
        x = torch.tensor(indices, dtype=torch.float32)
        return torch.stack([-x, -2 * x], 1)

    table = precomputed(tmp_path, 10, logps, batch_size=2, key={"k": 1}, chunk=4)
    assert table.tolist() == [[-i, -2 * i] for i in range(10)]
    assert sorted(i for c in calls for i in c) == list(range(10))
    (tmp_path / "chunk-000001.npy").unlink()
    calls.clear()
    assert torch.equal(precomputed(tmp_path, 10, logps, batch_size=2, key={"k": 1}, chunk=4), table)
    assert sorted(i for c in calls for i in c) == [4, 5, 6, 7]
    calls.clear()
    precomputed(tmp_path, 10, logps, batch_size=2, key={"k": 1}, chunk=4)
    assert calls == []
