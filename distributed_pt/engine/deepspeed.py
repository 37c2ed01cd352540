"""Build the DeepSpeed config from `configs/deepspeed/*.json` + the stage config, and initialize the engine.

The JSON holds ZeRO and offload knobs only. Batch sizes, precision, clipping and the optimizer come from the stage
config, so the two can never disagree silently: a batch size set in the JSON that differs is an error.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from distributed_pt.config import ConfigError, DeepSpeedConfig, OptimConfig, TrainConfig
from distributed_pt.paths import resolve_path

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

REDUCE_BUCKET_DEFAULT = 5e8  # DeepSpeed's reduce_bucket_size when the JSON names none
CPU_BUCKET = 6_000_000  # elements: 24 MB in fp32, within the 32 MiB blocks glibc serves from its heap (`train.py`)
FIT_BUCKETS = "_fit_buckets"  # build_ds_config's note to initialize (popped before DeepSpeed sees the config)
SINGLE_RANK_NOTE = "_single_rank_note"  # likewise: said once by `initialize`
_SAID: set[str] = set()


def build_ds_config(
    ds: DeepSpeedConfig, train: TrainConfig, optim: OptimConfig, dtype: str, world_size: int
) -> dict[str, Any]:
    path = resolve_path(ds.config)
    if not path.is_file():
        raise ConfigError(f"deepspeed.config: file not found: {ds.config}")
    try:
        conf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None

    global_batch = train.micro_batch_size * train.gradient_accumulation_steps * world_size
    if train.global_batch_size is not None and train.global_batch_size != global_batch:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} but micro_batch_size ({train.micro_batch_size}) x "
            f"gradient_accumulation_steps ({train.gradient_accumulation_steps}) x world size ({world_size}) "
            f"= {global_batch}"
        )
    batch = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": global_batch,
    }
    for key, value in batch.items():
        if key in conf and conf[key] not in (value, "auto"):
            raise ConfigError(f"{path}: '{key}'={conf[key]} disagrees with the stage config ({value}); remove it")
    conf.update(batch)

    zero = conf.setdefault("zero_optimization", {})
    if ds.zero_stage is not None:
        zero["stage"] = ds.zero_stage
    if ds.offload_optimizer is not None:
        zero["offload_optimizer"] = (
            {"device": "cpu", "pin_memory": True} if ds.offload_optimizer else {"device": "none"}
        )
    if ds.offload_param is not None:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True} if ds.offload_param else {"device": "none"}
    if _offloaded(zero, "offload_param") and zero.get("stage", 0) != 3:
        raise ConfigError(f"{path}: parameter offload needs ZeRO stage 3 (stage is {zero.get('stage', 0)})")
    if zero.get("stage", 0) == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
        if ds.sequence_parallel_size > 1:
            # DeepSpeed 0.19's ZeRO-3 reduce-scatter path averages gradients over every rank, sequence-parallel ones
            # included (1/SP of the gradient; its contiguous-bucket path divides by world / SP as ZeRO-1/2 do)
            zero["reduce_scatter"] = False
    if (
        world_size * ds.sequence_parallel_size == 1  # the ranks ZeRO partitions over
        and ds.zero_stage is None
        and zero.get("stage", 0) in (1, 2)
        and not _offloaded(zero, "offload_optimizer")
    ):
        # One data-parallel rank: ZeRO-1/2 partition nothing, yet cost gradient hooks, bucket copies and a second fp32
        # copy of the trainable weights. deepspeed.zero_stage keeps the JSON's stage.
        conf[SINGLE_RANK_NOTE] = (
            f"one data-parallel rank: ZeRO stage {zero['stage']} would partition nothing, running stage 0 "
            f"(deepspeed.zero_stage={zero['stage']} keeps it)"
        )
        zero["stage"] = 0

    conf[FIT_BUCKETS] = ds.fit_buckets
    conf["bf16"] = {"enabled": dtype == "bf16"}
    conf["fp16"] = {"enabled": dtype == "fp16", "loss_scale": 0, "initial_scale_power": 16}
    conf["gradient_clipping"] = optim.grad_clip
    conf.setdefault("steps_per_print", 10**9)  # we log ourselves
    conf["optimizer"] = {
        "type": "AdamW",
        "params": {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay},
    }
    # Off GPU and without offload, DeepSpeed's FusedAdam cannot run: torch's AdamW through DeepSpeed, fused (DeepSpeed
    # passes the extra key on): one kernel over each flat partition instead of the per-tensor loop it would pick
    # (25M parameters on 2 CPU cores: 16.7 ms a step instead of 111 ms, benchmarks/results/sft_step_cpu_one_rank.md).
    if not torch.cuda.is_available() and not _offloaded(zero, "offload_optimizer"):
        conf["optimizer"]["params"].update(torch_adam=True, fused=True)
    return conf


def _offloaded(zero: dict, key: str) -> bool:
    return zero.get(key, {}).get("device", "none") not in ("none", None)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on biases and norm weights (any parameter with ndim < 2)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_lambda(optim: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up to lr, then cosine/linear decay to lr * min_lr_ratio (or constant) at `total_steps`."""

    def f(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if optim.scheduler == "cosine" else 1 - progress
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * shape

    return f


def _ds_arch_list_ok(value: str) -> bool:
    """Whether DeepSpeed's JIT builder can parse a TORCH_CUDA_ARCH_LIST value (non-empty, `X.Y[+PTX]` entries)."""
    entries = value.replace(";", " ").split()
    return bool(entries) and all(re.fullmatch(r"\d+\.\d+(\+PTX)?", e) for e in entries)


def initialize(
    model: torch.nn.Module, ds_config: dict, optim: OptimConfig, total_steps: int, mpu: Any = None
) -> DeepSpeedEngine:
    """`deepspeed.initialize` with decay/no-decay groups and our warm-up + decay schedule (`mpu`: the sequence-parallel
    groups, `engine.sequence.setup`). Returns the engine."""
    import deepspeed

    if torch.cuda.is_available() and not _ds_arch_list_ok(os.environ.get("TORCH_CUDA_ARCH_LIST", "")):
        # FusedAdam JIT-builds for the archs listed here. DeepSpeed parses only `X.Y` / `X.Y+PTX` entries: a value
        # such as torch's `9.0a` (set by some CUDA images) fails with "invalid literal for int() ... '0a'".
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    schedule = lr_lambda(optim, total_steps)
    note = ds_config.pop(SINGLE_RANK_NOTE, None)
    if note and note not in _SAID:
        _SAID.add(note)
        print(note, flush=True)  # (one rank: it is rank 0)
    fit_reduce_bucket(ds_config, sum(p.numel() for p in model.parameters() if p.requires_grad))
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, optim.weight_decay),
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        mpu=mpu,
    )
    if not (engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled()):
        _keep_grad_norm(engine)
    if getattr(engine, "seq_dp_world_size", engine.dp_world_size) == 1 and not engine.zero_optimization():
        # Nothing to average over one rank, yet stage 0's all-reduce flattens every gradient into a bucket and back:
        # two copies of all gradients a step, and the bucket's memory.
        engine.enable_backward_allreduce = False
    elif not engine.zero_optimization() and not torch.cuda.is_available():
        # Stage 0 over several CPU ranks flattens the gradients into all-reduce buffers of 5e8 elements, which glibc
        # maps afresh every step (see fit_reduce_bucket); the reduction is elementwise, so smaller ones change nothing
        engine.allreduce_gradients = functools.partial(engine.allreduce_gradients, bucket_size=CPU_BUCKET)
    return engine


def _keep_grad_norm(engine: DeepSpeedEngine) -> None:
    """fp32 at ZeRO stage 0: DeepSpeed clips the gradients and drops their norm (`get_global_grad_norm` stays None);
    keep it, as the ZeRO and mixed-precision optimizers do. The gradients are whole and equal on every rank here, so
    torch's multi-tensor clip (one norm and one scale over all of them) replaces DeepSpeed's per-parameter loop and
    its all-reduce; with sequence-parallel groups (`mpu`) DeepSpeed's own."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip() -> None:
        parameters, max_norm = [p for p in engine.module.parameters() if p.grad is not None], engine.gradient_clipping()
        if engine.mpu is None:
            engine._global_grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm, foreach=True)
        else:
            engine._global_grad_norm = clip_grad_norm_(parameters, max_norm=max_norm, mpu=engine.mpu)

    engine.clip_fp32_gradients = clip


def fit_reduce_bucket(ds_config: dict, trainable: int) -> None:
    """`deepspeed.fit_buckets`: DeepSpeed allocates its gradient reduce bucket (ZeRO-1/2: two with `overlap_comm`;
    ZeRO-3: one) at `reduce_bucket_size` elements whatever the trainable set: 2 x 5e8 16-bit elements, 1.9 GiB, for a
    LoRA adapter of a few million parameters. A bucket of the trainable count (rounded up to even) holds every
    gradient of the step as before, so the reduction is unchanged; only the unused memory goes.

    Off GPU, ZeRO-1/2's buckets are also capped at `CPU_BUCKET` elements: DeepSpeed allocates them afresh every
    backward, and glibc maps any block over 32 MiB anew, so each step page-faulted its buckets in again (2 CPU ranks,
    25M parameters, fp32: 57k faults a backward with the fitted 100 MB buckets, 12.4k capped; backward 421 -> 367 ms).
    The reduction is elementwise, so smaller buckets change only how many all-reduces carry it."""
    zero = ds_config.get("zero_optimization", {})
    if not ds_config.pop(FIT_BUCKETS, True) or zero.get("stage", 0) == 0 or trainable <= 0:
        return
    needed = trainable + trainable % 2
    if needed < float(zero.get("reduce_bucket_size", REDUCE_BUCKET_DEFAULT)):
        zero["reduce_bucket_size"] = needed
    if not torch.cuda.is_available() and zero["stage"] in (1, 2):
        for key in ("reduce_bucket_size", "allgather_bucket_size"):
            zero[key] = min(float(zero.get(key, REDUCE_BUCKET_DEFAULT)), CPU_BUCKET)


def frozen_engine(model: torch.nn.Module, ds_config: dict, offload: bool) -> DeepSpeedEngine:
    """A DeepSpeed engine without optimizer for a frozen model (PPO's reference and reward model): ZeRO-3
    (partitioned; parameters offloaded to CPU with `offload`) when training runs ZeRO-3 or `offload` is set, else a
    plain replica. Batch sizes and precision come from the training engine's `ds_config`."""
    import deepspeed

    model.requires_grad_(False)
    zero = {"stage": 3 if ds_config["zero_optimization"].get("stage", 0) == 3 or offload else 0}
    if offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    # no train_batch_size: DeepSpeed derives it over all ranks (a frozen engine has no sequence-parallel groups)
    keys = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "bf16", "fp16")
    engine, *_ = deepspeed.initialize(
        model=model, config={**{k: ds_config[k] for k in keys}, "zero_optimization": zero}
    )
    engine.eval()
    return engine


def stage_ds_config(cfg: Any, optim: OptimConfig | None = None) -> dict[str, Any]:
    """`build_ds_config` for a stage config at this run's data-parallel size (world / sequence-parallel size;
    `optim` overrides cfg.optim, e.g. a critic's)."""
    from distributed_pt import dist

    replicas = dist.world_size() // cfg.deepspeed.sequence_parallel_size
    return build_ds_config(cfg.deepspeed, cfg.train, optim or cfg.optim, cfg.model.dtype, replicas)
