"""SFT end to end through the real `deepspeed` launcher on 2 CPU ranks (gloo)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import DEMO, ROOT, SFT_CONFIG, TINY_SFT, env, launch_cmd, read_metrics, run_launcher, train_losses
from tests.conftest import SFT_STEPS as STEPS

CONFIG = SFT_CONFIG


def _assert_learns(out: Path) -> None:
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (STEPS - 2, STEPS - 1, STEPS)) / 3
    assert last < 0.85 * first, losses
    evals = [m for m in read_metrics(out) if "eval/loss" in m]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == STEPS
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]


def test_zero2_two_ranks_loss_falls_and_exports(sft_zero2_run):
    _assert_learns(sft_zero2_run)
    # The resolved config and the checkpoints are beside the metrics; `latest` names the newest complete one.
    assert (sft_zero2_run / "config.yaml").is_file()
    assert (sft_zero2_run / "checkpoints" / "latest").read_text() == f"step_{STEPS}"
    # The HF export reloads with plain transformers and generates.
    model = AutoModelForCausalLM.from_pretrained(sft_zero2_run / "final")
    tok = AutoTokenizer.from_pretrained(sft_zero2_run / "final")
    ids = tok("reverse : cat dog =", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, zero3_partitioned) -> Path:
    out = tmp_path_factory.mktemp("sft_zero3")
    run_launcher(
        CONFIG, [*TINY_SFT, f"output_dir={out}", f"train.max_steps={STEPS}", f"deepspeed.config={zero3_partitioned}"]
    )
    return out


def test_zero3_two_ranks_loss_falls_and_export_is_whole(zero3_run):
    _assert_learns(zero3_run)
    # Exported from partitioned parameters: every tensor has its full shape and matches the checkpoint's fp32 weights.
    model = AutoModelForCausalLM.from_pretrained(zero3_run / "final")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(zero3_run / "checkpoints"))
    for name, p in model.named_parameters():
        assert p.numel() > 0
        torch.testing.assert_close(p, consolidated[f"module.{name}"].to(p.dtype))  # the engine holds a Backbone


def test_fused_loss_under_zero3_matches_plain_loss(tmp_path, zero3_partitioned, zero3_run, monkeypatch):
    """The fused LM-head kernel (interpreted on CPU), head weight partitioned by ZeRO-3, trains the same curve."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    overrides = [
        *TINY_SFT,
        f"output_dir={tmp_path}",
        f"train.max_steps={STEPS}",
        f"deepspeed.config={zero3_partitioned}",
    ]
    proc = run_launcher(CONFIG, [*overrides, "loss.fused=true", "eval.num_generate=0"])
    assert "fused LM-head cross-entropy" in proc.stdout
    fused, plain = train_losses(tmp_path), train_losses(zero3_run)
    assert sorted(fused) == sorted(plain)
    for step in plain:
        assert fused[step] == pytest.approx(plain[step], rel=1e-3), (step, fused, plain)


def test_sigterm_saves_and_resume_matches_uninterrupted_run(tmp_path, sft_zero2_run):
    """Stop a run with SIGTERM mid-way, resume it, and get the uninterrupted run's loss curve exactly."""
    # An eval every step (greedy: the training curve is unchanged) spreads the 40 steps over seconds rather than under
    # one, so that the signal lands in training even when this process is slow to wake up.
    overrides = [*TINY_SFT, f"output_dir={tmp_path}", f"train.max_steps={STEPS}", "checkpoint.save_every=20"]
    overrides.append("train.eval_every=1")
    # Its own process group, signalled as a whole: what Slurm preemption or a cluster scheduler does.
    proc = subprocess.Popen(
        launch_cmd(CONFIG, overrides), cwd=ROOT, env=env(), stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text():  # the step-0 eval is logged: training starts now
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, "a run stopped by SIGTERM must not report success"
    stopped_at = int((tmp_path / "checkpoints" / "latest").read_text().split("_")[1])
    assert f"stopped by a signal: saved a checkpoint at step {stopped_at}" in stdout, stdout[-3000:]
    assert 1 <= stopped_at < STEPS

    run_launcher(CONFIG, overrides)  # checkpoint.resume=auto
    resumed, reference = train_losses(tmp_path), train_losses(sft_zero2_run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), (step, resumed, reference)


def test_bad_input_gives_clear_errors(tmp_path):
    """Each mistake stops the single-process entry point (`python -m distributed_pt.train`) with a clear message."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n')
    cases = {
        f"data.train_files=[{bad}]": f"{bad}:2: malformed JSON",
        "optim.learning_rate=1": "unknown key 'optim.learning_rate'",
        "model.path=/does/not/exist": "model.path: '/does/not/exist' is not a local directory",
        "train.global_batch_size=7": "train.global_batch_size=7",
    }
    for override, message in cases.items():
        cmd = [sys.executable, "-m", "distributed_pt.train", str(CONFIG), *TINY_SFT, f"output_dir={tmp_path}", override]
        proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, (override, proc.stderr[-2000:])
        assert message in proc.stderr, (override, proc.stderr[-2000:])


def test_resume_refuses_a_checkpoint_written_with_other_training_data(tmp_path):
    """Re-running in an output_dir whose checkpoint came from other data stops with a clear error, keeping it."""
    data = tmp_path / "train.jsonl"
    data.write_text((DEMO / "sft_train.jsonl").read_text())
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "distributed_pt.train",
        str(CONFIG),
        *TINY_SFT,
        f"output_dir={out}",
        f"data.train_files=[{data}]",
        "train.max_steps=2",
        "eval.num_generate=0",
        "checkpoint.export_hf=false",
    ]
    subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300, check=True)
    with data.open("a") as f:
        f.write('{"prompt": "reverse: a b", "response": "b a"}\n')
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"the training data changed since {out / 'checkpoints' / 'step_2'} was written" in proc.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step_2"
    ok = subprocess.run(
        [*cmd, "checkpoint.resume=none"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300
    )
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_non_finite_loss_stops_every_rank_naming_the_step(tmp_path):
    # An absurd learning rate blows the weights up after the first update: step 2's loss is inf/NaN.
    overrides = [*TINY_SFT, f"output_dir={tmp_path}", "train.max_steps=5", "optim.lr=1e20", "optim.warmup_steps=0"]
    proc = run_launcher(CONFIG, overrides, check=False, timeout=180)
    assert proc.returncode != 0
    assert "non-finite loss at step 2" in proc.stdout + proc.stderr, proc.stdout[-3000:]


def test_demo_config_is_the_documented_default():
    from distributed_pt.config import load_config

    cfg = load_config(CONFIG)
    assert cfg.data.train_files == ["distributed_pt/assets/demo/sft_train.jsonl"]
    assert (ROOT / cfg.data.train_files[0]).is_file() and (DEMO / "tokenizer").is_dir()


def test_lora_zero3_two_ranks_adapter_loads_in_peft(tmp_path, zero3_partitioned):
    """LoRA SFT from a saved base under ZeRO-3: the adapter is whole, PEFT loads it, and it equals the merged export."""
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(DEMO / "tokenizer")
    torch.manual_seed(0)
    base_cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    LlamaForCausalLM(base_cfg).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    out = tmp_path / "run"
    overrides = [
        *TINY_SFT,
        "model.init_config=null",
        f"model.path={tmp_path / 'base'}",
        f"output_dir={out}",
        "train.max_steps=4",
        "lora.enabled=true",
        "lora.r=4",
        f"deepspeed.config={zero3_partitioned}",
    ]
    run_launcher(CONFIG, overrides)
    adapter = out / "final" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    from safetensors.torch import load_file

    weights = load_file(adapter / "adapter_model.safetensors")
    assert weights and all(t.numel() > 0 for t in weights.values())
    assert any(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k), "lora_B never trained"

    ids = tok(["sort : b a c =", "add : 1 + 2 ="], return_tensors="pt", padding=True)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), adapter)
    merged = AutoModelForCausalLM.from_pretrained(out / "final")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**ids).logits, merged(**ids).logits, rtol=1e-4, atol=1e-4)


def test_one_step_is_the_same_however_its_examples_are_split(tmp_path):
    """8 examples as 1 micro batch of 8, as 4 accumulated micro batches of 2, and as 2 ranks x 4 (ZeRO-2 and stage 0)
    give the same update: the loss is normalised over the step's response tokens. Adam with eps >> |g| (and lr = eps)
    steps by the gradient itself, so a wrong scale shows, not only a wrong direction."""
    from safetensors.torch import load_file

    data = tmp_path / "eight.jsonl"
    data.write_text("".join((DEMO / "sft_train.jsonl").read_text().splitlines(keepends=True)[:8]))
    common = [*TINY_SFT, f"data.train_files=[{data}]", "data.eval_files=[]", "train.max_steps=1",
              "optim.warmup_steps=0", "optim.scheduler=constant", "optim.weight_decay=0", "optim.grad_clip=1e9",
              "optim.eps=100", "eval.num_generate=0", "deepspeed.config=configs/deepspeed/zero2.json"]  # fmt: skip
    runs = {
        "init": (["optim.lr=0", "train.micro_batch_size=8"], 1),
        "1x8": (["optim.lr=100", "train.micro_batch_size=8"], 1),
        "4x2": (["optim.lr=100", "train.micro_batch_size=2", "train.gradient_accumulation_steps=4"], 1),
        "2 ranks x4": (["optim.lr=100", "train.micro_batch_size=4"], 2),
        "2 ranks x4 stage 0": (["optim.lr=100", "train.micro_batch_size=4", "deepspeed.zero_stage=0"], 2),
    }
    params = {}
    for name, (overrides, nproc) in runs.items():
        out = tmp_path / name.replace(" ", "_")
        run_launcher(SFT_CONFIG, [*common, *overrides, f"output_dir={out}"], nproc=nproc)
        params[name] = load_file(out / "final" / "model.safetensors")
    delta = {k: {n: p - params["init"][n] for n, p in v.items()} for k, v in params.items() if k != "init"}
    assert max(d.abs().max().item() for d in delta["1x8"].values()) > 1e-3, "the step must move the weights"
    for name in ("4x2", "2 ranks x4", "2 ranks x4 stage 0"):  # (stage 0: DeepSpeed's all-reduce, not ZeRO's)
        for n, p in params[name].items():
            torch.testing.assert_close(p, params["1x8"][n], rtol=1e-6, atol=1e-7, msg=f"{name}: {n}")
            torch.testing.assert_close(delta[name][n], delta["1x8"][n], rtol=1e-4, atol=1e-6, msg=f"{name}: {n}")


def test_packing_under_zero3_with_lora_learns_and_resumes_exactly(tmp_path, zero3_partitioned, sft_zero2_run):
    """Packed rows (2 ranks, ZeRO-3, LoRA): the loss falls, less of each batch is padding than without packing, and a
    run resumed from its step-6 checkpoint repeats the uninterrupted run's losses."""
    overrides = [*TINY_SFT, "data.packing=true", "lora.enabled=true", "optim.lr=1e-2", "train.max_steps=12",
                 "checkpoint.save_every=6", "eval.num_generate=0", f"deepspeed.config={zero3_partitioned}"]  # fmt: skip
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_launcher(CONFIG, [*overrides, f"output_dir={full}"])
    losses = train_losses(full)
    assert losses[12] < losses[1]
    padding = [m["padding_fraction"] for m in read_metrics(full) if "padding_fraction" in m]
    unpacked = [m["padding_fraction"] for m in read_metrics(sft_zero2_run) if "padding_fraction" in m]
    assert max(padding) < min(unpacked), (padding, unpacked)

    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_6", resumed / "checkpoints" / "step_6")
    (resumed / "checkpoints" / "latest").write_text("step_6")
    run_launcher(CONFIG, [*overrides, f"output_dir={resumed}"])
    again = train_losses(resumed)
    for step in range(7, 13):
        assert again[step] == pytest.approx(losses[step], rel=1e-5, abs=1e-6), (step, again, losses)
