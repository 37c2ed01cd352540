"""GRPO end to end on 2 CPU ranks through the `deepspeed` launcher: the SFT output as policy, the demo checker (and a
format reward) as reward functions."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT, read_metrics, run_launcher

CONFIG = ROOT / "configs" / "grpo_tiny.yaml"
STEPS = 4


def _overrides(sft: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.path={sft / 'final'}", f"output_dir={out}", f"train.max_steps={STEPS}", "train.micro_batch_size=8",
        "train.log_every=1", "train.eval_every=0", "grpo.rollout_batch_size=4", "grpo.num_generations=4",
        "grpo.max_new_tokens=8", "grpo.sample_every=2", "eval.num_generate=16", "checkpoint.save_every=2",
        "optim.lr=1e-3", "optim.warmup_steps=0", "logging.wandb_mode=disabled", "logging.progress_bar=false", *extra,
    ]  # fmt: skip


def _steps(out: Path) -> dict[int, dict]:
    return {m["step"]: m for m in read_metrics(out) if "reward" in m and "eval/reward" not in m}


@pytest.fixture(scope="module")
def grpo_zero2_run(tmp_path_factory, sft_zero2_run) -> Path:
    out = tmp_path_factory.mktemp("grpo_zero2")
    run_launcher(CONFIG, _overrides(sft_zero2_run, out, "deepspeed.config=configs/deepspeed/zero2.json"))
    return out


KEYS = ["reward", "reward/exact_answer", "reward/format_reward", "reward_group_std", "zero_std_fraction",
        "completion_length", "completion_length_max", "clipped_fraction", "eos_fraction", "clip_low_fraction",
        "clip_high_fraction", "entropy", "loss", "gen_tokens_per_s", "train_tokens_per_s"]  # fmt: skip


def test_zero2_completes_rollouts_and_updates(grpo_zero2_run):
    steps = _steps(grpo_zero2_run)
    assert sorted(steps) == list(range(1, STEPS + 1))
    for m in steps.values():
        assert all(k in m for k in KEYS), sorted(m)
        assert 0.0 <= m["zero_std_fraction"] <= 1.0 and m["completion_length_max"] <= 8
    evals = [m for m in read_metrics(grpo_zero2_run) if "eval/exact_match" in m]
    assert len(evals) == 2 and any(k.startswith("eval/exact_match/") for k in evals[-1])
    assert (grpo_zero2_run / "final" / "model.safetensors").is_file()


def test_resume_matches_the_uninterrupted_run(tmp_path, grpo_zero2_run, sft_zero2_run):
    """Resume from the step-2 checkpoint (as after a crash): steps 3-4 equal the uninterrupted run's."""
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(grpo_zero2_run / "checkpoints" / "step_2", out / "checkpoints" / "step_2")
    (out / "checkpoints" / "latest").write_text("step_2")
    run_launcher(CONFIG, _overrides(sft_zero2_run, out, "deepspeed.config=configs/deepspeed/zero2.json"))
    resumed, reference = _steps(out), _steps(grpo_zero2_run)
    for step in (3, 4):
        for key in ("reward", "loss", "completion_length", "entropy"):
            assert resumed[step][key] == pytest.approx(reference[step][key], rel=1e-4, abs=1e-6), (step, key)


def test_zero3_with_lora_and_kl_to_adapters_off(tmp_path, sft_zero2_run, zero3_partitioned):
    overrides = _overrides(
        sft_zero2_run, tmp_path, f"deepspeed.config={zero3_partitioned}", "lora.enabled=true", "lora.r=4",
        "grpo.beta=0.1", "grpo.num_iterations=2", "grpo.loss_type=dapo", "checkpoint.save_every=0",
    )  # fmt: skip
    proc = run_launcher(CONFIG, overrides)
    assert "reference: the policy with LoRA adapters off" in proc.stdout
    steps = _steps(tmp_path)
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert all("kl" in m for m in steps.values()) and any(abs(m["kl"]) > 0 for m in steps.values())
    assert (tmp_path / "final" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_reward_model_alone(tmp_path, sft_zero2_run, rm_zero2_run):
    """GRPO scored by the RM stage's model (normalised by its reward stats) instead of functions."""
    overrides = _overrides(
        sft_zero2_run, tmp_path, f"grpo.reward_model={rm_zero2_run / 'final'}", "reward.functions=[]",
        "checkpoint.save_every=0", "deepspeed.config=configs/deepspeed/zero2.json",
    )  # fmt: skip
    run_launcher(CONFIG, overrides)
    steps = _steps(tmp_path)
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert all(m["reward"] == pytest.approx(m["reward/reward_model"], abs=1e-5) for m in steps.values())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("reward.functions=[]", "reward.functions: GRPO needs reward functions"),
        ("grpo.num_generations=1", "grpo.num_generations must be >= 2"),
        ("grpo.rollout_batch_size=3", "must be a multiple of train.micro_batch_size"),
        ("grpo.overlong_buffer=12", "grpo.overlong_buffer must be in"),
        ("grpo.overlong_buffer=-1", "grpo.overlong_buffer must be in"),
        ("grpo.max_extra_rollouts=-1", "grpo.max_extra_rollouts must be >= 0"),
        ("rollout.correction=token", "rollout.correction=token: needs rollout.engine=vllm"),
        ("rollout.correction_cap=0.5", "rollout.correction_cap must be >= 1"),
        ("rollout.tensor_parallel_size=0", "rollout.tensor_parallel_size must be >= 1"),
    ],
)
def test_check_config_names_the_key(override, message):
    from distributed_pt.config import ConfigError, load_config
    from distributed_pt.stages import grpo

    grpo.check_config(load_config(CONFIG))  # the shipped config passes
    with pytest.raises(ConfigError, match=message):
        grpo.check_config(load_config(CONFIG, [override]))


def test_the_critic_free_family_in_one_run(tmp_path, sft_zero2_run):
    """REINFORCE++-baseline (KL in the rewards) with GSPO-token ratios, DAPO's dynamic sampling, overlong shaping and
    truncated-completion masking, on 2 ranks under ZeRO-2: each step trains on as many informative groups on every
    rank (at most rollout_batch_size), the extra rollouts stay within their bound, and the new metrics are logged."""
    extra = ["deepspeed.config=configs/deepspeed/zero2.json", "grpo.advantage_estimator=reinforce_pp_baseline",
             "grpo.beta=0.05", "grpo.importance_sampling_level=sequence_token", "grpo.dynamic_sampling=true",
             "grpo.max_extra_rollouts=2", "grpo.overlong_buffer=3", "grpo.mask_truncated=true",
             "checkpoint.save_every=0", "train.max_steps=3"]  # fmt: skip
    run_launcher(CONFIG, _overrides(sft_zero2_run, tmp_path, *extra))
    steps = {m["step"]: m for m in read_metrics(tmp_path) if "reward" in m and "eval/reward" not in m}
    assert sorted(steps) == [1, 2, 3]
    for m in steps.values():
        assert 0 <= m["extra_rollouts"] <= 2 and 0 <= m["dropped_group_fraction"] <= 1
        assert 1 <= m["groups"] <= 4 and m["groups"] == int(m["groups"])  # the same count on both ranks (mean)
        if m["extra_rollouts"] < 2:  # stopped early: the batch was full
            assert m["groups"] == 4
        for key in ("advantage_mean", "advantage_std", "sequence_clip_fraction", "overlong_fraction",
                    "reward/overlong", "kl"):  # fmt: skip
            assert key in m, (key, sorted(m))
        assert abs(m["advantage_mean"]) < 1.0 and m["reward/overlong"] <= 0
