"""Searches over a stage config with the memory planner (`engine.planner`): the cheapest changes that make a config
fit its GPUs, and the longest sequence that fits (`python -m distributed_pt.plan ... --longest`)."""

from __future__ import annotations

import copy
from typing import Any

from distributed_pt.engine.planner import Hardware, Plan, make_plan


def suggest(cfg: Any, hw: Hardware, plan: Plan) -> list[dict[str, Any]]:
    """When `plan` does not fit: the changes (config overrides), cheapest first, that each make it fit, with their
    predicted memory; if none does alone, the cheapest combination that does (or the closest one)."""
    from distributed_pt.typed_config import apply_override

    mb, gas = cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps
    candidates: list[dict[str, str]] = []
    if cfg.stage != "rm" and cfg.loss.fused == "false":
        candidates.append({"loss.fused": "auto"})
    if not cfg.model.gradient_checkpointing:
        candidates.append({"model.gradient_checkpointing": "true"})
    if cfg.stage == "dpo" and not cfg.dpo.precompute_reference and not cfg.lora.enabled:
        candidates.append({"dpo.precompute_reference": "true"})
    if cfg.stage == "ppo" and not cfg.ppo.offload_frozen:
        candidates.append({"ppo.offload_frozen": "true"})
    if plan.arch["zero_stage"] < 3:
        candidates.append({"deepspeed.zero_stage": "3"})
    smaller = [mb // k for k in (2, 4, 8, 16, 32, 64) if mb // k >= 1 and mb % k == 0]
    candidates += [{"train.micro_batch_size": str(m), "train.gradient_accumulation_steps": str(gas * mb // m)}
                   for m in smaller]  # fmt: skip
    if not cfg.model.tiled_mlp and plan.arch["tokens_per_micro_batch"] > 2 * plan.arch["hidden"]:
        tiles = -(-plan.arch["tokens_per_micro_batch"] // plan.arch["hidden"])  # ALST's choice: tiles of ~hidden tokens
        candidates.append({"model.tiled_mlp": str(tiles)})
    if cfg.model.gradient_checkpointing and not cfg.model.offload_activations:
        candidates.append({"model.offload_activations": "true"})
    if plan.arch["sequence_parallel_stage"]:  # sequence parallelism: each rank 1/SP of every sequence
        candidates += [{"deepspeed.sequence_parallel_size": str(k)} for k in parallel_sizes(plan)
                       if k > plan.arch["sequence_parallel"]]  # fmt: skip
    if not cfg.lora.enabled:
        candidates.append({"lora.enabled": "true", "lora.r": "16"})
    if not plan.arch["offload_optimizer"]:
        candidates.append({"deepspeed.offload_optimizer": "true"})
    if not plan.arch["offload_param"]:
        candidates.append({"deepspeed.zero_stage": "3", "deepspeed.offload_param": "true"})

    def total(overrides: dict[str, str]) -> float:
        changed = copy.deepcopy(cfg)
        for key, value in overrides.items():
            apply_override(changed, f"{key}={value}")
        return make_plan(changed, hw).total

    def entry(overrides: dict[str, str], t: float) -> dict[str, Any]:
        return {"change": [f"{k}={v}" for k, v in overrides.items()], "total": t, "fits": t <= hw.gpu_memory}

    fitting = []
    for overrides in candidates:
        if "train.micro_batch_size" in overrides and any("train.micro_batch_size=" in c for f in fitting
                                                         for c in f["change"]):  # fmt: skip
            continue  # the largest micro batch that fits is the one worth naming
        t = total(overrides)
        if t <= hw.gpu_memory:
            fitting.append(entry(overrides, t))
    if fitting:
        return fitting
    combined: dict[str, str] = {}
    best = plan.total
    for overrides in candidates:  # cumulatively, keeping each change that lowers the peak
        t = total(combined | overrides)
        if t < best:
            combined, best = combined | overrides, t
            if t <= hw.gpu_memory:
                break
    return [entry(combined, best)] if combined else []


def parallel_sizes(plan: Plan) -> list[int]:
    """Sequence-parallel sizes a plan's hardware and model allow: powers of two dividing the world and the heads."""
    world, heads = plan.hardware.world, plan.arch["heads"]
    if not plan.arch["sequence_parallel_stage"]:
        return [1]
    return [k for k in (2**i for i in range(world.bit_length())) if world % k == 0 and heads % k == 0]


def length_key(cfg: Any) -> str:
    """What "sequence length" means for a stage: the completion length of PPO/GRPO (prompt + completion is trained),
    else `data.max_length`."""
    return f"{cfg.stage}.max_new_tokens" if cfg.stage in ("ppo", "grpo") else "data.max_length"


def longest_sequence(cfg: Any, hw: Hardware, step: int = 256, limit: int = 2**23) -> int:
    """The longest `length_key(cfg)` (a multiple of `step`, at most `limit`) whose plan fits on `hw`; 0 if none."""
    from distributed_pt.typed_config import apply_override

    def fits(length: int) -> bool:
        changed = copy.deepcopy(cfg)
        apply_override(changed, f"{length_key(cfg)}={length}")
        return make_plan(changed, hw).fits

    low, high = 0, limit // step  # in steps; fits(low * step) holds or low is 0
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid * step) else (low, mid - 1)
    return low * step
