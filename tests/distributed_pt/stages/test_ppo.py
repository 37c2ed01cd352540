"""PPO end to end on 2 CPU ranks through the `deepspeed` launcher: SFT output as actor, RM output as reward/critic."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT, read_metrics, run_launcher

CONFIG = ROOT / "configs" / "ppo_tiny.yaml"
STEPS = 4


def _overrides(sft: Path, rm: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.path={sft / 'final'}", f"ppo.reward_model={rm / 'final'}", f"output_dir={out}",
        f"train.max_steps={STEPS}", "train.micro_batch_size=4", "train.log_every=1", "train.eval_every=0",
        "ppo.rollout_batch_size=8", "ppo.max_new_tokens=8", "ppo.sample_every=2", "eval.num_generate=8",
        "checkpoint.save_every=2", "logging.wandb_mode=disabled", "logging.progress_bar=false", *extra,
    ]  # fmt: skip


def _steps(out: Path) -> dict[int, dict]:
    return {m["step"]: m for m in read_metrics(out) if "policy_loss" in m}


@pytest.fixture(scope="module")
def ppo_zero2_run(tmp_path_factory, sft_zero2_run, rm_zero2_run) -> Path:
    out = tmp_path_factory.mktemp("ppo_zero2")
    run_launcher(CONFIG, _overrides(sft_zero2_run, rm_zero2_run, out, "deepspeed.config=configs/deepspeed/zero2.json"))
    return out


KEYS = ["score", "reward", "kl", "entropy", "policy_loss", "value_loss", "policy_clipfrac", "approx_kl",
        "explained_variance", "response_length", "eos_fraction", "gen_tokens_per_s", "train_tokens_per_s"]  # fmt: skip


def test_zero2_completes_rollouts_and_updates(ppo_zero2_run):
    steps = _steps(ppo_zero2_run)
    assert sorted(steps) == list(range(1, STEPS + 1))
    for m in steps.values():
        assert all(k in m for k in KEYS), sorted(m)
        assert m["response_length"] > 0 and m["train_tokens_per_s"] > 0
    assert steps[1]["kl"] == pytest.approx(0.0, abs=1e-5)  # the actor starts as the reference
    assert any(abs(m["kl"]) > 1e-6 for m in steps.values())  # and then moves away from it
    evals = [m for m in read_metrics(ppo_zero2_run) if "eval/score" in m]
    assert [e["step"] for e in evals] == [0, STEPS] and "eval/exact_match" in evals[0]
    assert (ppo_zero2_run / "final" / "model.safetensors").is_file()
    assert (ppo_zero2_run / "critic" / "model.safetensors").is_file()


def test_resume_matches_the_uninterrupted_run(tmp_path, ppo_zero2_run, sft_zero2_run, rm_zero2_run):
    """Resume from the step-2 checkpoint (as after a crash): steps 3-4 equal the uninterrupted run's."""
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ppo_zero2_run / "checkpoints" / "step_2", out / "checkpoints" / "step_2")
    (out / "checkpoints" / "latest").write_text("step_2")
    shutil.copy(ppo_zero2_run / "metrics.jsonl", out / "metrics.jsonl")  # steps after 2 are dropped on resume
    run_launcher(CONFIG, _overrides(sft_zero2_run, rm_zero2_run, out, "deepspeed.config=configs/deepspeed/zero2.json"))
    resumed, reference = _steps(out), _steps(ppo_zero2_run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in (3, 4):
        for key in ("score", "kl", "policy_loss", "value_loss", "response_length"):
            assert resumed[step][key] == pytest.approx(reference[step][key], rel=1e-4, abs=1e-6), (step, key)


def test_zero3_with_lora_reference_as_adapters_off(tmp_path, sft_zero2_run, rm_zero2_run, zero3_partitioned):
    """Also: with ppo.critic_warmup_steps=1 the first step trains only the critic."""
    overrides = _overrides(
        sft_zero2_run, rm_zero2_run, tmp_path, f"deepspeed.config={zero3_partitioned}", "lora.enabled=true",
        "lora.r=4", "optim.lr=1e-3", "checkpoint.save_every=0", "ppo.critic_warmup_steps=1",
    )  # fmt: skip
    proc = run_launcher(CONFIG, overrides)
    assert "reference: the actor with LoRA adapters off" in proc.stdout
    steps = {m["step"]: m for m in read_metrics(tmp_path) if "value_loss" in m}
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert "policy_loss" not in steps[1] and all("policy_loss" in steps[s] for s in range(2, STEPS + 1))
    # The actor did not move in the warm-up step (step 2's rollout is still the reference's), then it does.
    assert steps[1]["kl"] == pytest.approx(0.0, abs=1e-5) and steps[2]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert any(abs(steps[s]["kl"]) > 1e-6 for s in range(3, STEPS + 1))
    assert (tmp_path / "final" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("ppo.reward_model=null", "ppo.reward_model: set it"),
        ("ppo.rollout_batch_size=65", "ppo.rollout_batch_size must be a multiple"),
        ("ppo.critic_warmup_steps=-1", "ppo.critic_warmup_steps must be >= 0, got -1"),
    ],
)
def test_check_config_names_the_key(override, message):
    from distributed_pt.config import ConfigError, load_config
    from distributed_pt.stages import ppo

    ppo.check_config(load_config(CONFIG))  # the shipped config passes
    with pytest.raises(ConfigError, match=message):
        ppo.check_config(load_config(CONFIG, [override]))


def test_reward_function_instead_of_a_reward_model(tmp_path, sft_zero2_run, rm_zero2_run):
    """PPO with the demo checker as its only reward: no reward model is loaded; the critic starts from the actor."""
    overrides = [o for o in _overrides(sft_zero2_run, rm_zero2_run, tmp_path) if not o.startswith("ppo.reward_model")]
    overrides += ["ppo.reward_model=null", "reward.functions=[distributed_pt.rl.rewards:exact_answer]",
                  "checkpoint.save_every=0", "deepspeed.config=configs/deepspeed/zero2.json"]  # fmt: skip
    run_launcher(CONFIG, overrides)
    steps = _steps(tmp_path)
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert all(0.0 - 1.0 - 1e-6 <= steps[s]["score"] <= 1.0 + 1e-6 for s in steps)  # exact answer (+ no-EOS penalty)
