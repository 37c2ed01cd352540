"""What a stage config needs per GPU, before anything is allocated: the memory planner behind
`python -m distributed_pt.plan` (and the plan every run logs beside its measured peak).

    plan = make_plan(cfg, Hardware(gpus_per_node=8, nodes=2, gpu_memory=80 * GiB))
    print(render(plan))

The model is built on the meta device (no memory, no weights read) from `model.preset`, `model.path`'s config.json
or `model.init_config`, with LoRA applied as training would; everything else is arithmetic. Per GPU:

* **Model states**, following what DeepSpeed 0.19 actually holds (checked tensor by tensor against
  `benchmarks/bench_memory.py --cpu`): 16-bit weights (ZeRO-3: 1/N of them, plus parameters of at most
  `stage3_param_persistence_threshold` elements kept whole on every rank); 16-bit gradients of the trainable
  parameters (ZeRO-0: all; ZeRO-1 and 2 alike: the parameters overlapping this rank's partition of each flat group,
  whole, so a large tied embedding that straddles a boundary is held by two ranks — not with optimizer offload;
  ZeRO-3: 1/N); fp32 master weights and
  Adam's two moments (12 bytes per trainable parameter, 1/N from ZeRO-1; on the host with optimizer offload, which
  also keeps fp32 gradients there).
* **Communication buffers**: ZeRO-1/2's reduce bucket (`reduce_bucket_size` 16-bit elements, two with
  `overlap_comm`), ZeRO-3's reduce bucket and prefetch bucket.
* **Activations** of a micro batch: with gradient checkpointing each layer's input plus one layer's saved tensors
  during its recompute; without, every layer's saved tensors (``ACT_BYTES`` per token for a Llama-style block).
  With sequence parallelism (SP) a rank holds 1/SP of each sequence's tokens, plus one layer's all-to-all buffers
  (its q, k, v and attention output re-laid by heads: ``A2A_BYTES`` per local token). Tiled MLPs keep none of the
  MLP intermediates, only one tile's during its recompute; offloaded activations keep the checkpoints (each layer's
  input) in host memory.
* **Logits**: none with the fused LM-head loss; else ``LOGIT_BYTES`` per token per vocabulary entry.
* **Optimizer step**: fp32 gradients of this rank's partition while the step runs (the peak of full fine-tuning).
* **Stage extras**: DPO's frozen reference; PPO's critic (a second trained model), reference and reward model;
  GRPO's reference (beta > 0) and reward model; PPO/GRPO's generation KV cache (and, under ZeRO-3, the whole
  policy gathered for generation).

Peak = model states + buffers + extras + max(activations + logits, optimizer step, generation). The per-token
constants are measured, not derived: they were fitted to `benchmarks/results/bench_memory_h100.json` (H100, bf16,
seq 2048, 17 cases), which the planner then matches within 15% (tests/distributed_pt/engine/test_planner.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from pathlib import Path
from typing import Any

import torch

from distributed_pt.config import ConfigError, ModelConfig

GiB = 2**30
# Bytes kept per token by one Llama-style block for its backward, in 16-bit: 24*hidden + 4*kv_dim + 8*intermediate
# (norm inputs in fp32, q/k/v, the attention inputs with k/v repeated, its output, the MLP's four intermediates).
ACT_HIDDEN, ACT_KV, ACT_INTERMEDIATE = 24, 4, 8
# Ulysses' all-to-all buffers of one layer, 16-bit bytes per local token: q and the output (2 * hidden) and k, v
# (2 * kv_dim), each once more as the collective's output.
A2A_HIDDEN, A2A_KV = 4, 4
SEQUENCE_PARALLEL_STAGES = ("sft", "dpo", "rm", "ppo", "grpo")
# Bytes per token per vocabulary entry at the loss when logits are materialised (fitted: H100, bf16). Counted at every
# token: the unfused SFT loss sends only the labelled positions through the head, so for it this is the worst case.
LOGIT_BYTES = {0: 4.5, 1: 4.5, 2: 4.5, 3: 10.5}
# ZeRO-3's gathered-parameter working set beyond its buckets, in bytes (fitted: H100).
ZERO3_WORKING_SET = 0.15 * GiB
DEEPSPEED_DEFAULTS = {
    "reduce_bucket_size": 5e8,
    "stage3_prefetch_bucket_size": 5e7,
    "stage3_param_persistence_threshold": 1e5,
    "overlap_comm": False,
}


@dataclasses.dataclass
class Hardware:
    gpus_per_node: int = 8
    nodes: int = 1
    gpu_memory: float = 80 * GiB
    peak_tflops: float = 989.0  # H100 SXM dense bf16
    mfu: float = 0.4

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclasses.dataclass
class Arch:
    """What the planner reads from a model: parameter counts and the shapes that size activations."""

    params: int
    trainable: int
    layers: int
    hidden: int
    heads: int
    intermediate: int
    kv_dim: int
    vocab: int
    linear_weights: int  # weights of the linear layers (LM head and adapters included): FLOPs
    persistent: int  # parameters of at most the ZeRO-3 persistence threshold (whole on every rank)
    grad_partition: int  # the most trainable elements a ZeRO-1/2 rank's gradients hold at the planned world size

    def layer_bytes(self, dtype_bytes: int) -> float:
        per = ACT_HIDDEN * self.hidden + ACT_KV * self.kv_dim + ACT_INTERMEDIATE * self.intermediate
        return per * dtype_bytes / 2


@dataclasses.dataclass
class Plan:
    hardware: Hardware
    items: dict[str, float]  # name -> bytes per GPU (the peak's terms)
    host: dict[str, float]  # name -> bytes per rank on the host (offloaded states)
    total: float
    arch: dict[str, Any]
    tokens_per_step: int
    step_time_s: float
    notes: list[str]
    suggestions: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.total <= self.hardware.gpu_memory

    def record(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["fits"] = self.fits
        return out


# ----------------------------------------------------------------------------------------------------------------------
# The model, on the meta device.


def hf_config(model: ModelConfig) -> Any:
    """The transformers config a stage would build (as `models.loading`): model.path's config.json, or the preset in
    its place when given (a checkpoint planned for need not be on this machine), else the random-init config the
    loader builds from `model.preset` or `model.init_config` with the run's tokenizer."""
    from transformers import AutoConfig

    from distributed_pt.models.loading import init_model_config, load_tokenizer
    from distributed_pt.models.presets import hf_config as config_of
    from distributed_pt.models.presets import load_preset

    if model.path is None:
        return init_model_config(model, load_tokenizer(model))
    if model.preset is not None:
        return config_of(load_preset(model.preset))
    if not (Path(model.path) / "config.json").is_file():
        raise ConfigError(f"model.path: no config.json in '{model.path}' (or give model.preset to plan without it)")
    return AutoConfig.from_pretrained(model.path, local_files_only=True, trust_remote_code=model.trust_remote_code)


def arch(model: ModelConfig, lora: Any, world: int, head: str = "lm") -> Arch:
    """Build the model on the meta device (LoRA applied as training would) and read its sizes. `head`: "lm" or
    "score" (a reward model or critic: the LM head replaced by a scalar head)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from distributed_pt.engine.deepspeed import param_groups
    from distributed_pt.models.lora import apply_lora

    config = hf_config(model)
    with torch.device("meta"):
        if head == "score":
            config.num_labels = 1
            net = AutoModelForSequenceClassification.from_config(config)
        else:
            net = AutoModelForCausalLM.from_config(config)
        if lora is not None and lora.enabled:
            apply_lora(net, lora)
        elif lora is None:
            net.requires_grad_(False)
    params = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    linear = sum(
        m.weight.numel() + sum(getattr(m, n).numel() for n in ("lora_A", "lora_B") if hasattr(m, n))
        for m in net.modules()
        if hasattr(m, "weight")
        and m.weight is not None
        and m.weight.ndim == 2
        and not isinstance(m, torch.nn.Embedding)
    )
    persistent = sum(
        p.numel() for p in net.parameters() if p.numel() <= DEEPSPEED_DEFAULTS["stage3_param_persistence_threshold"]
    )
    groups = [[p.numel() for p in g["params"]] for g in param_groups(net, 0.1)]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    heads = text.num_attention_heads
    return Arch(
        params=params,
        trainable=trainable,
        layers=text.num_hidden_layers,
        hidden=hidden,
        heads=heads,
        intermediate=getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden,
        kv_dim=hidden // heads * (getattr(text, "num_key_value_heads", None) or heads),
        vocab=text.vocab_size,
        linear_weights=linear,
        persistent=persistent,
        grad_partition=_grad_partition_max(groups, world),
    )


def _grad_partition_max(groups: list[list[int]], world: int) -> int:
    """ZeRO-1/2: each flat group is cut into `world` equal partitions and a rank's gradient buffer holds every
    parameter that overlaps its partition whole. The largest rank's total."""
    per_rank = [0] * world
    for sizes in filter(sum, groups):  # (an empty group has no partitions)
        part = math.ceil(sum(sizes) / world)
        start = 0
        for n in sizes:
            for r in range(start // part, min(world, math.ceil((start + n) / part))):
                per_rank[r] += n
            start += n
    return max(per_rank)


# ----------------------------------------------------------------------------------------------------------------------
# The arithmetic.


@dataclasses.dataclass
class ZeroSettings:
    stage: int
    offload_optimizer: bool
    offload_param: bool
    reduce_bucket: float
    prefetch_bucket: float
    overlap_comm: bool
    fit_buckets: bool = True

    @classmethod
    def of(cls, cfg: Any, world: int) -> ZeroSettings:
        """What the run will use at `world` data-parallel ranks (one rank runs stage 0 unless told otherwise)."""
        from distributed_pt.engine.deepspeed import build_ds_config

        train = dataclasses.replace(cfg.train, global_batch_size=None)  # the batch check is the run's, not the plan's
        zero = build_ds_config(cfg.deepspeed, train, cfg.optim, cfg.model.dtype, world)["zero_optimization"]

        def on(key: str) -> bool:
            return zero.get(key, {}).get("device", "none") not in ("none", None)

        get = {**DEEPSPEED_DEFAULTS, **zero}.get
        return cls(int(zero.get("stage", 0)), on("offload_optimizer"), on("offload_param"),
                   float(get("reduce_bucket_size")), float(get("stage3_prefetch_bucket_size")),
                   bool(get("overlap_comm")), cfg.deepspeed.fit_buckets)  # fmt: skip


def model_states(a: Arch, z: ZeroSettings, world: int, dtype_bytes: int) -> tuple[dict[str, float], dict[str, float]]:
    """(GPU, host) bytes per rank of a trained model's weights, gradients and optimizer states."""
    b, fp32 = dtype_bytes, dtype_bytes == 4
    if z.stage >= 3:
        params = b * (a.params / world + a.persistent)
        grads = b * a.trainable / world
    else:
        params = b * a.params
        # ZeRO-1/2 hold whole the parameters straddling a partition boundary, except with optimizer offload, which
        # copies each gradient's own slice to the host (measured: benchmarks/results/bench_memory_cpu.json)
        whole = a.trainable / world if z.offload_optimizer else a.grad_partition
        grads = b * (a.trainable if z.stage == 0 else whole)
    shard = a.trainable / (world if z.stage >= 1 else 1)
    optimizer = (8 if fp32 else 12) * shard
    gpu = {"parameters": params, "gradients": grads, "optimizer states": optimizer}
    host: dict[str, float] = {}
    if z.offload_optimizer:
        gpu["optimizer states"] = 0.0
        host = {"optimizer states": optimizer, "fp32 gradients": 4 * shard}
    if z.offload_param and z.stage >= 3:
        host["parameters"] = params
        gpu["parameters"] = b * a.persistent
    return gpu, host


def frozen_bytes(a: Arch, z: ZeroSettings, world: int, dtype_bytes: int, offload: bool) -> float:
    """A frozen model's weights per GPU (`engine.deepspeed.frozen_engine`: ZeRO-3 when training is, or offloaded)."""
    if offload:
        return dtype_bytes * a.persistent
    if z.stage >= 3:
        return dtype_bytes * (a.params / world + a.persistent)
    return dtype_bytes * a.params


def buffers(z: ZeroSettings, dtype_bytes: int, trainable: int) -> float:
    """Communication buffers DeepSpeed allocates (ZeRO-1/2 reduce bucket(s); ZeRO-3's reduce and prefetch buckets and
    its gathered working set). The reduce bucket is `reduce_bucket_size` elements whatever the model's size, unless
    `deepspeed.fit_buckets` caps it at the trainable count (`engine.deepspeed.fit_reduce_bucket`)."""
    if z.stage == 0 or trainable == 0:
        return 0.0
    bucket = min(z.reduce_bucket, trainable + trainable % 2) if z.fit_buckets else z.reduce_bucket
    if z.stage >= 3:
        return dtype_bytes * (bucket + z.prefetch_bucket) + ZERO3_WORKING_SET
    return dtype_bytes * bucket * (2 if z.overlap_comm else 1)


def activations(a: Arch, tokens: int, checkpointing: bool, dtype_bytes: int, sp: int = 1, tiles: int = 0) -> float:
    """Bytes a rank keeps for the backward of a micro batch of `tokens` (this rank's: 1/SP of the sequences'). Tiled
    MLPs (`model.tiled_mlp`) keep none of the MLP's intermediates, only one tile's while it is recomputed."""
    mlp = ACT_INTERMEDIATE * a.intermediate * dtype_bytes / 2 if tiles else 0.0  # per token
    layer = tokens * (a.layer_bytes(dtype_bytes) - mlp)
    a2a = 0.0 if sp == 1 else tokens * (A2A_HIDDEN * a.hidden + A2A_KV * a.kv_dim) * dtype_bytes / 2
    transient = a2a + (tokens / tiles * mlp if tiles else 0.0)  # one layer's all-to-all, one MLP tile
    if checkpointing:
        return a.layers * tokens * a.hidden * dtype_bytes + layer + transient
    return a.layers * layer + transient


def flops_per_token(a: Arch, seq_len: float, checkpointing: bool) -> float:
    """Training FLOPs per token: 2N forward + 2N input gradients + 2N_trainable weight gradients (+2N recompute with
    gradient checkpointing), N = linear weights; attention 12 * layers * hidden * seq_len (as engine.metrics)."""
    trainable_linear = min(a.trainable, a.linear_weights)
    return (4 + 2 * checkpointing) * a.linear_weights + 2 * trainable_linear + 12 * a.layers * a.hidden * seq_len


def make_plan(cfg: Any, hw: Hardware) -> Plan:
    """Per-GPU memory and step time of `cfg` (any stage config) on `hw`; suggestions are added by `suggest`."""
    stage, world, b = cfg.stage, hw.world, 4 if cfg.model.dtype == "fp32" else 2
    sp = cfg.deepspeed.sequence_parallel_size
    z = ZeroSettings.of(cfg, world // sp)  # ZeRO partitions over every rank, sequence-parallel ones included
    scalar = stage in ("rm", "classify")  # a score head: no LM logits
    lora = cfg.lora
    if stage == "classify":  # the mode decides: LoRA, all weights, or none (feature: a frozen forward, then a head)
        lora = (
            None if cfg.classify.mode == "feature" else dataclasses.replace(lora, enabled=cfg.classify.mode == "lora")
        )
    main = arch(cfg.model, lora, world, head="score" if scalar else "lm")
    if sp < 1 or world % sp or main.heads % sp or sp > 1 and stage not in SEQUENCE_PARALLEL_STAGES:
        raise ConfigError(f"deepspeed.sequence_parallel_size={sp}: must divide the world ({world}) and the attention "
                          f"heads ({main.heads}), for {', '.join(SEQUENCE_PARALLEL_STAGES)}")  # fmt: skip
    items, host = model_states(main, z, world, b)
    items["communication buffers"] = buffers(z, b, main.trainable)
    notes: list[str] = []

    seq, mb = cfg.data.max_length, cfg.train.micro_batch_size
    section = getattr(cfg, stage, None) if stage in ("ppo", "grpo") else None
    if section is not None:
        seq += section.max_new_tokens
    sequences = mb * (2 if stage in ("rm", "dpo") else 1)  # a pair's two sides go through in one forward
    tokens = sequences * -(-seq // sp)  # this rank's share of the micro batch
    ckpt = cfg.model.gradient_checkpointing or main.trainable == 0  # nothing kept for a backward: one layer's worth
    fused = not scalar and cfg.loss.fused != "false"  # auto = on for a GPU
    offloaded = main.layers * tokens * main.hidden * b if cfg.model.offload_activations else 0.0  # the checkpoints
    if offloaded:
        host["activation checkpoints"] = offloaded
    # packed rows on sdpa under SP: the within-sample mask (bool, and sdpa's additive copy) over whole rows
    attn = cfg.model.attn_implementation
    sdpa = attn == "sdpa" or attn == "auto" and importlib.util.find_spec("flash_attn") is None
    mask = mb * seq**2 * (1 + b) if sp > 1 and cfg.data.packing and sdpa else 0.0
    if mask:
        notes.append(
            f"packed rows on sdpa: a (T, T) attention mask per row, {mask / GiB:.2f} GiB (flash attention: none)"
        )
    phases = {
        "activations + logits": activations(main, tokens, ckpt, b, sp, cfg.model.tiled_mlp)
        - offloaded
        + mask
        + (0.0 if fused or scalar else LOGIT_BYTES[z.stage] * tokens * main.vocab),
        "optimizer step (fp32 gradients)": 0.0
        if z.offload_optimizer
        else 4 * (main.trainable / (world if z.stage else 1)),
    }
    frozen = dataclasses.replace(main, trainable=0)  # the same weights, none trained
    if stage == "dpo" and cfg.dpo.loss_type != "simpo" and not cfg.dpo.precompute_reference and not cfg.lora.enabled:
        items["reference model"] = frozen_bytes(frozen, z, world, b, cfg.dpo.offload_reference)
    if stage in ("ppo", "grpo"):
        offload = getattr(section, "offload_frozen", False)
        needs_reference = stage == "ppo" or section.beta > 0
        if needs_reference and not cfg.lora.enabled:
            items["reference model"] = frozen_bytes(frozen, z, world, b, offload)
        if section.reward_model:
            scorer = arch(cfg.model, None, world, head="score")
            items["reward model"] = frozen_bytes(scorer, z, world, b, offload)
            notes.append("reward model and critic sized as the policy's architecture with a scalar head")
        rollout = section.rollout_batch_size * (section.num_generations if stage == "grpo" else 1)
        kv_cache = rollout * seq * main.layers * 2 * main.kv_dim * b
        gathered = b * main.params if z.stage >= 3 else 0.0  # ZeRO-3 gathers the whole policy once per rollout
        phases["generation (KV cache, gathered weights)"] = kv_cache + gathered
    if stage == "ppo":
        critic = arch(cfg.model, dataclasses.replace(cfg.lora, enabled=False), world, head="score")
        critic_gpu, critic_host = model_states(critic, z, world, b)
        items["critic (weights, gradients, optimizer)"] = sum(critic_gpu.values()) + buffers(z, b, critic.trainable)
        host |= {f"critic {k}": v for k, v in critic_host.items()}

    peak_phase = max(phases, key=phases.get)
    items[peak_phase] = phases[peak_phase]
    notes.append(f"peak during: {peak_phase} (" + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in phases.items()) + ")")
    tokens_per_step = sequences * seq * cfg.train.gradient_accumulation_steps * world // sp
    flops = tokens_per_step * flops_per_token(main, seq, ckpt) * (1.5 if "reference model" in items else 1.0)
    step_time = flops / (world * hw.peak_tflops * 1e12 * hw.mfu)
    if section is not None:
        notes.append("step time: training FLOPs only (generation not included)")
    summary = {"parameters": main.params, "trainable": main.trainable, "layers": main.layers, "hidden": main.hidden,
               "vocab": main.vocab, "zero_stage": z.stage, "offload_optimizer": z.offload_optimizer,
               "offload_param": z.offload_param, "gradient_checkpointing": ckpt, "fused_loss": fused,
               "tokens_per_micro_batch": tokens, "dtype": cfg.model.dtype, "sequence_parallel": sp,
               "heads": main.heads, "sequence_parallel_stage": stage in SEQUENCE_PARALLEL_STAGES}  # fmt: skip
    return Plan(hw, items, host, sum(items.values()), summary, tokens_per_step, step_time, notes)


def render(plan: Plan, source: str = "") -> str:
    hw, a = plan.hardware, plan.arch
    lines = [
        f"plan for {source or 'the config'}: {hw.nodes} node(s) x {hw.gpus_per_node} GPU(s), "
        f"{hw.gpu_memory / GiB:.0f} GiB each",
        f"model: {a['parameters'] / 1e9:.3f}B parameters, {a['trainable'] / 1e9:.4f}B trainable; ZeRO-{a['zero_stage']}"
        f"{', optimizer offload' if a['offload_optimizer'] else ''}"
        f"{', parameter offload' if a['offload_param'] else ''}"
        f"; {a['dtype']}; gradient checkpointing {'on' if a['gradient_checkpointing'] else 'off'}; "
        f"fused loss {'on' if a['fused_loss'] else 'off'}; {a['tokens_per_micro_batch']} tokens per micro batch"
        + (f" and rank (sequence parallel {a['sequence_parallel']})" if a["sequence_parallel"] > 1 else ""),
        "",
        "per GPU                                  GiB",
    ]
    lines += [f"  {name:<38} {value / GiB:8.2f}" for name, value in plan.items.items()]
    lines.append(f"  {'total (predicted peak)':<38} {plan.total / GiB:8.2f}   of {hw.gpu_memory / GiB:.0f}: "
                 + ("fits" if plan.fits else "DOES NOT FIT"))  # fmt: skip
    if plan.host:
        lines.append("host, per rank: " + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in plan.host.items()))
    lines.append(f"step: {plan.tokens_per_step} tokens, about {plan.step_time_s:.2f} s at {hw.mfu:.0%} MFU of "
                 f"{hw.peak_tflops:.0f} TFLOPS per GPU")  # fmt: skip
    lines += [f"note: {n}" for n in plan.notes]
    if plan.suggestions:
        lines.append("changes that make it fit (cheapest first):" if plan.suggestions[0]["fits"]
                     else "no change found that fits; the closest:")  # fmt: skip
        lines += [f"  {' '.join(s['change'])}  ->  {s['total'] / GiB:.2f} GiB" for s in plan.suggestions]
    return "\n".join(lines)


def run_plan(cfg: Any, world: int, local_world: int) -> dict[str, float]:
    """The plan of a starting run on its own hardware, as metrics ("plan/peak_gib", ...) to log beside the measured
    `peak_mem_gib`, so every GPU run checks the planner. {} (and a printed reason) when it cannot be planned."""
    from distributed_pt import dist

    memory = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 0
    hw = Hardware(gpus_per_node=local_world, nodes=max(1, world // local_world), gpu_memory=memory)
    try:
        plan = make_plan(cfg, hw)
    except Exception as e:  # noqa: BLE001 - a plan is advice; it never stops a run
        dist.print0(f"plan: not available ({type(e).__name__}: {e})")
        return {}
    states = sum(plan.items.get(k, 0.0) for k in ("parameters", "gradients", "optimizer states"))
    dist.print0(f"plan: predicted peak {plan.total / GiB:.2f} GiB per GPU (model states {states / GiB:.2f} GiB); "
                "measured: peak_mem_gib in the metrics")  # fmt: skip
    return {"plan/peak_gib": plan.total / GiB, "plan/model_states_gib": states / GiB}
