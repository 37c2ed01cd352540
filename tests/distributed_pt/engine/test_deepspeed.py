"""The DeepSpeed config built from the JSON + stage config, AdamW parameter groups, and the LR schedule."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from distributed_pt.config import ConfigError, DeepSpeedConfig, OptimConfig, TrainConfig
from distributed_pt.engine import deepspeed as ds_mod
from distributed_pt.engine.deepspeed import build_ds_config, lr_lambda, param_groups
from tests.conftest import ROOT, free_port


def build(config="configs/deepspeed/zero2.json", dtype="bf16", world=2, ds=None, train=None, optim=None):
    return build_ds_config(
        ds or DeepSpeedConfig(config=str(config)),
        train or TrainConfig(micro_batch_size=4, gradient_accumulation_steps=3),
        optim or OptimConfig(),
        dtype,
        world,
    )


def write_json(tmp_path, obj, name="ds.json"):
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return path


def test_batch_fields_are_filled_from_the_stage_config():
    conf = build(world=2)
    assert conf["train_micro_batch_size_per_gpu"] == 4
    assert conf["gradient_accumulation_steps"] == 3
    assert conf["train_batch_size"] == 4 * 3 * 2
    assert conf["zero_optimization"]["stage"] == 2
    assert conf["zero_optimization"]["overlap_comm"] is True  # the JSON's knobs are kept


def test_optimizer_and_clipping_come_from_the_stage_config():
    optim = OptimConfig(lr=3e-4, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.05, grad_clip=0.5)
    conf = build(optim=optim)
    assert conf["optimizer"]["type"] == "AdamW"
    params = conf["optimizer"]["params"]
    assert (params["lr"], params["betas"], params["eps"], params["weight_decay"]) == (3e-4, [0.8, 0.9], 1e-6, 0.05)
    assert conf["gradient_clipping"] == 0.5
    json.dumps(conf)  # serializable (betas is a list, not a tuple)


def test_global_batch_size_is_checked():
    ok = build(train=TrainConfig(micro_batch_size=2, gradient_accumulation_steps=4, global_batch_size=16), world=2)
    assert ok["train_batch_size"] == 16
    with pytest.raises(ConfigError, match="global_batch_size=32") as e:
        build(train=TrainConfig(micro_batch_size=2, gradient_accumulation_steps=4, global_batch_size=32), world=2)
    assert "= 16" in str(e.value)


@pytest.mark.parametrize(
    "conflict",
    [{"train_batch_size": 64}, {"train_micro_batch_size_per_gpu": 8}, {"gradient_accumulation_steps": 1}],
)
def test_conflicting_batch_size_in_the_json_is_an_error_naming_the_file(tmp_path, conflict):
    path = write_json(tmp_path, {"zero_optimization": {"stage": 1}, **conflict})
    with pytest.raises(ConfigError) as e:
        build(path)
    assert str(path) in str(e.value) and next(iter(conflict)) in str(e.value)


def test_agreeing_or_auto_batch_sizes_in_the_json_are_accepted(tmp_path):
    path = write_json(tmp_path, {"train_batch_size": 24, "train_micro_batch_size_per_gpu": "auto"})
    conf = build(path, world=2)
    assert conf["train_batch_size"] == 24 and conf["train_micro_batch_size_per_gpu"] == 4
    assert conf["zero_optimization"] == {}  # no ZeRO section in the file: created empty


def test_missing_and_malformed_json(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        build(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "zero_optimization": {"stage": 2,}\n}')
    with pytest.raises(ConfigError, match="malformed JSON") as e:
        build(bad)
    assert f"{bad}:2" in str(e.value)


def test_config_path_is_resolved_from_the_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert build("configs/deepspeed/zero3.json")["zero_optimization"]["stage"] == 3


def test_the_json_file_is_not_modified(tmp_path):
    path = write_json(tmp_path, {"zero_optimization": {"stage": 1}})
    before = path.read_text()
    build(path, ds=DeepSpeedConfig(config=str(path), zero_stage=3, offload_param=True))
    assert path.read_text() == before


def test_zero_stage_and_offload_overrides():
    ds = DeepSpeedConfig(
        config="configs/deepspeed/zero2.json", zero_stage=3, offload_optimizer=True, offload_param=True
    )
    zero = build(ds=ds)["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    # Turning offload off in a file that has it on.
    ds = DeepSpeedConfig(config="configs/deepspeed/zero3_offload.json", offload_optimizer=False, offload_param=False)
    zero = build(ds=ds)["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "none"} and zero["offload_param"] == {"device": "none"}
    # Unset overrides leave the file's values alone.
    zero = build(ds=DeepSpeedConfig(config="configs/deepspeed/zero2_offload.json"))["zero_optimization"]
    assert zero["stage"] == 2 and zero["offload_optimizer"]["device"] == "cpu"


def test_param_offload_needs_stage_3():
    with pytest.raises(ConfigError, match="parameter offload needs ZeRO stage 3"):
        build(ds=DeepSpeedConfig(config="configs/deepspeed/zero2.json", offload_param=True))
    with pytest.raises(ConfigError, match=r"stage is 2"):
        build(ds=DeepSpeedConfig(config="configs/deepspeed/zero3_offload.json", zero_stage=2))
    conf = build(ds=DeepSpeedConfig(config="configs/deepspeed/zero3_offload.json", zero_stage=2, offload_param=False))
    assert conf["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize(
    ("dtype", "bf16", "fp16"), [("bf16", True, False), ("fp16", False, True), ("fp32", False, False)]
)
def test_precision_flags(dtype, bf16, fp16):
    conf = build(dtype=dtype)
    assert conf["bf16"]["enabled"] is bf16
    assert conf["fp16"]["enabled"] is fp16


def test_torch_adam_off_gpu_unless_the_optimizer_is_offloaded(monkeypatch):
    monkeypatch.setattr(ds_mod.torch.cuda, "is_available", lambda: False)
    params = build()["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True
    offloaded = build(ds=DeepSpeedConfig(config="configs/deepspeed/zero2_offload.json"))
    assert "torch_adam" not in offloaded["optimizer"]["params"]  # DeepSpeedCPUAdam runs on CPU
    monkeypatch.setattr(ds_mod.torch.cuda, "is_available", lambda: True)
    assert not {"torch_adam", "fused"} & set(build()["optimizer"]["params"])  # FusedAdam on GPU


ONE_STEP = """
import copy, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from distributed_pt import dist
from distributed_pt.config import DeepSpeedConfig, OptimConfig, TrainConfig
from distributed_pt.engine.deepspeed import build_ds_config, initialize, lr_lambda, param_groups

dist.setup_single_process_env()
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2))
reference = copy.deepcopy(model)
optim = OptimConfig(lr=3e-3, weight_decay=0.1, warmup_steps=2, grad_clip=0.5)
stage = int(sys.argv[1])
ds = DeepSpeedConfig(config="configs/deepspeed/zero2.json", zero_stage=stage)
conf = build_ds_config(ds, TrainConfig(micro_batch_size=2), optim, "fp32", 1)
engine = initialize(model, conf, optim, total_steps=10)
assert engine.zero_optimization_stage() == stage
assert engine.enable_backward_allreduce is (stage > 0)  # nothing to all-reduce over one rank at stage 0
basic = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch optimizer
assert isinstance(basic, torch.optim.AdamW) and basic.defaults["fused"] is True, basic.defaults
ref_opt = torch.optim.AdamW(param_groups(reference, optim.weight_decay), lr=optim.lr, betas=optim.betas,
                            eps=optim.eps, foreach=False, fused=False)
ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lr_lambda(optim, 10))
for step in range(3):
    ids = torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(step))
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    reference(input_ids=ids, labels=ids).loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), optim.grad_clip)
    ref_opt.step(); ref_sched.step(); ref_opt.zero_grad()
    torch.testing.assert_close(float(engine.get_global_grad_norm()), norm.item(), rtol=1e-5, atol=0)
    for (name, got), want in zip(engine.module.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step} {name}: {m}")
dist.destroy()
print("SAME")
"""


@pytest.mark.parametrize("stage", [0, 2])
def test_the_fused_cpu_adamw_steps_like_the_reference_adamw(stage):
    """Three clipped steps through DeepSpeed (fused torch AdamW off GPU) equal torch's reference AdamW's, parameter for
    parameter, to fp32 tolerance (ZeRO-2 steps the flat partition; the reference, per tensor without foreach), and the
    logged gradient norm is the reference's (kept at stage 0 too)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_PORT=str(free_port()))
    proc = subprocess.run(
        [sys.executable, "-c", ONE_STEP, str(stage)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "SAME" in proc.stdout, proc.stderr[-4000:]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs" / "deepspeed").glob("*.json")))
def test_every_bundled_json_builds(name):
    conf = build(ROOT / "configs" / "deepspeed" / name)
    assert conf["train_batch_size"] == 24


# --- parameter groups ------------------------------------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)  # weight (2D) + bias (1D)
        self.norm = nn.LayerNorm(4)  # weight + bias (1D)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(4, 10, bias=False)


def test_param_groups_decay_matrices_only():
    model = Tiny()
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == ids([model.embed.weight, model.proj.weight, model.head.weight])
    assert ids(no_decay["params"]) == ids([model.proj.bias, model.norm.weight, model.norm.bias])
    # Frozen parameters are in neither group.
    assert not ids(model.frozen.parameters()) & (ids(decay["params"]) | ids(no_decay["params"]))


def test_param_groups_on_a_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32)
    )
    decay, no_decay = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] for p in no_decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters() if "norm" in n}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# --- learning-rate schedule ------------------------------------------------------------------------------------------


def test_linear_warmup():
    f = lr_lambda(OptimConfig(warmup_steps=4, scheduler="cosine"), total_steps=20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0  # decay starts at the peak


@pytest.mark.parametrize(
    ("scheduler", "quarter", "half", "end"),
    [
        ("cosine", 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)), 0.55, 0.1),
        ("linear", 0.1 + 0.9 * 0.75, 0.55, 0.1),
        ("constant", 1.0, 1.0, 1.0),
    ],
)
def test_decay_shapes_and_end_values(scheduler, quarter, half, end):
    f = lr_lambda(OptimConfig(warmup_steps=4, scheduler=scheduler, min_lr_ratio=0.1), total_steps=20)
    assert f(4 + 4) == pytest.approx(quarter)  # 16 decay steps: a quarter in
    assert f(4 + 8) == pytest.approx(half)
    assert f(20) == pytest.approx(end)
    assert f(100) == pytest.approx(end)  # clamped past the end
    values = [f(s) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_schedule_drives_an_optimizer_to_min_lr():
    optim = OptimConfig(lr=1e-2, warmup_steps=2, scheduler="cosine", min_lr_ratio=0.2)
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=optim.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(optim, total_steps=10))
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(5e-3) and lrs[1] == pytest.approx(1e-2)
    assert opt.param_groups[0]["lr"] == pytest.approx(optim.lr * optim.min_lr_ratio)


def test_no_warmup_starts_at_full_lr():
    f = lr_lambda(OptimConfig(warmup_steps=0, scheduler="linear", min_lr_ratio=0.0), total_steps=10)
    assert f(0) == 1.0 and f(5) == pytest.approx(0.5) and f(10) == 0.0


def test_the_reduce_bucket_is_fitted_to_the_trainable_parameters():
    """DeepSpeed allocates reduce_bucket_size elements (twice with overlap_comm) whatever trains: capped at the
    trainable count (even) unless deepspeed.fit_buckets=false; ZeRO-0 has no bucket to fit. Off GPU both buckets are
    capped at CPU_BUCKET elements (glibc would map larger ones afresh every step)."""
    from distributed_pt.engine.deepspeed import CPU_BUCKET, FIT_BUCKETS, fit_reduce_bucket

    def fitted(trainable: int, **ds) -> dict:
        conf = build_ds_config(DeepSpeedConfig(config="configs/deepspeed/zero2.json", **ds), TrainConfig(),
                               OptimConfig(), "bf16", 2)  # fmt: skip
        fit_reduce_bucket(conf, trainable)
        assert FIT_BUCKETS not in conf  # never reaches DeepSpeed
        return conf["zero_optimization"]

    assert fitted(3_000_001)["reduce_bucket_size"] == 3_000_002
    large = fitted(10**10)
    cap = 5e8 if torch.cuda.is_available() else CPU_BUCKET
    assert large["reduce_bucket_size"] == cap and large["allgather_bucket_size"] == cap
    assert fitted(1000, fit_buckets=False)["reduce_bucket_size"] == 5e8
    assert fitted(1000, zero_stage=0)["reduce_bucket_size"] == 5e8


def test_one_data_parallel_rank_runs_stage_0_unless_told(capsys):
    def zero(world: int, **ds) -> tuple[dict, dict]:
        conf = build_ds_config(DeepSpeedConfig(config="configs/deepspeed/zero2.json", **ds), TrainConfig(),
                               OptimConfig(), "fp32", world)  # fmt: skip
        return conf["zero_optimization"], conf

    one, conf = zero(1)
    assert one["stage"] == 0 and "deepspeed.zero_stage=2 keeps it" in conf[ds_mod.SINGLE_RANK_NOTE]
    assert zero(2)[0]["stage"] == 2 and ds_mod.SINGLE_RANK_NOTE not in zero(2)[1]
    assert zero(1, zero_stage=2)[0]["stage"] == 2  # said explicitly: kept
    assert zero(1, offload_optimizer=True)[0]["stage"] == 2  # offload still moves memory off the GPU
    assert zero(1, zero_stage=3)[0]["stage"] == 3
    assert zero(1, sequence_parallel_size=2)[0]["stage"] == 2  # one replica of 2 ranks: ZeRO partitions over both
    # ZeRO-3's reduce-scatter path would average gradients over the sequence-parallel ranks too (1/SP of them)
    assert zero(1, sequence_parallel_size=2, zero_stage=3)[0]["reduce_scatter"] is False
    assert "reduce_scatter" not in zero(2, zero_stage=3)[0]
