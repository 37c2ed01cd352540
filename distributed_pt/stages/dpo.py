"""DPO: preference optimisation without a reward model or rollouts, on the RM stage's preference pairs.

    deepspeed --num_gpus 8 --module distributed_pt.train configs/dpo_tiny.yaml [key.sub=value ...]

Models: the policy (`model.path`, an SFT output; LoRA or full) on its DeepSpeed engine, and the reference, the
policy's starting point: a frozen copy (ZeRO-3 with its parameters on CPU under `dpo.offload_reference`), the same
model with its LoRA adapters off, or log-probs precomputed in one cached pass (`dpo.precompute_reference`: no
reference model in memory while training; see `rl.reference`). SimPO (`dpo.loss_type: simpo`) needs no reference.

Each micro batch puts its chosen and rejected sides through the policy in one forward; the sequence log-prob of a
side is the sum over its response tokens (prompt and padding masked; the fused LM-head kernel on CUDA, no full
logits). Loss and implicit rewards: `losses.dpo`; + `dpo.sft_coef` x the chosen side's per-token NLL (RPO).
With `data.packing`, whole pairs are packed into rows (`data.packing.collate_packed_dpo`); sums are per sample.
Long pairs lose their prompt's start first, then their responses' ends (`data.preference`). Outputs as for SFT.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from distributed_pt import dist
from distributed_pt.config import ConfigError, DPOConfig
from distributed_pt.data.collate import Batch, Examples, ShardedBatches
from distributed_pt.data.dataset import TokenizedDataset
from distributed_pt.data.io import read_rows
from distributed_pt.data.packing import PackedDataset, collate_packed_dpo
from distributed_pt.data.preference import collate_dpo_pairs, load_preference_data
from distributed_pt.engine import sequence
from distributed_pt.engine.deepspeed import frozen_engine, initialize, stage_ds_config
from distributed_pt.engine.generation import exact_match_by_task, greedy_answers
from distributed_pt.engine.loop import Run, check_finite, data_cache, export, fingerprint, start
from distributed_pt.engine.metrics import StepTimer
from distributed_pt.losses.dpo import dpo_loss
from distributed_pt.models.heads import Backbone, use_fused_loss
from distributed_pt.models.loading import load_model, load_tokenizer, make_trainable
from distributed_pt.rl.logprobs import reference_logprobs, segment_sums, token_logprobs
from distributed_pt.rl.reference import precomputed

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from transformers import PreTrainedTokenizerBase


@dataclasses.dataclass
class Policy:
    """The engine that trains and where its reference log-probs come from: `reference` (a frozen engine), else
    `tables` ({"train"|"eval": (N, 2) precomputed chosen/rejected log-probs}), else the LoRA adapters switched off;
    none for SimPO."""

    engine: DeepSpeedEngine
    reference: DeepSpeedEngine | None
    tables: dict[str, torch.Tensor] | None
    fused: bool
    pad_id: int
    cfg: DPOConfig

    def loss(self, items: list, split: str, indices: list[int]) -> tuple[torch.Tensor, dict, int, int]:
        """The loss of a micro batch (`items`: pairs, or packed rows of pairs; `indices`: the pairs' indices in
        `split`, in the order `collate_*` numbers them), its statistics, real tokens and token slots."""
        dpo = self.cfg.dpo
        batch, response, segment, n = pair_batch(items, self.pad_id, self.engine.device)
        logps, lengths = self.sequence_logps(batch, response, segment, 2 * n)
        ref = None if dpo.loss_type == "simpo" else self.reference_logps(batch, response, segment, split, indices)
        chosen, rejected = logps.chunk(2)
        loss, stats = dpo_loss(
            chosen, rejected, *(ref.chunk(2) if ref is not None else (None, None)), dpo.loss_type, dpo.beta,
            dpo.label_smoothing, dpo.gamma, *lengths.chunk(2),
        )  # fmt: skip
        nll = -(chosen / lengths[:n]).mean()
        stats["nll"] = nll.item()
        if dpo.sft_coef:
            loss = loss + dpo.sft_coef * nll
        return loss, stats, batch.num_tokens, batch.input_ids.numel()

    def sequence_logps(
        self, batch: Batch, response: torch.Tensor, segment: torch.Tensor, n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(n,) the policy's sequence log-probs and response lengths. Training with sequence parallelism: each rank
        sums over its shard of the sequences and the group adds the parts (`engine.sequence`); evaluation runs whole
        sequences."""
        cut = sequence.Shard.of(self.cfg) if self.engine.module.training else sequence.Shard(1, 0)
        inputs = cut.inputs(batch.input_ids, batch.model_mask, position_ids=batch.position_ids)
        logp = token_logprobs(self.engine, temperature=1.0, fused=self.fused, **inputs)[0]
        keep, seg = cut(response[:, 1:], False), cut(segment[:, 1:])
        sums = [segment_sums(v, keep, seg, n, shifted=True) for v in (logp, torch.ones_like(logp))]
        if cut.reduce is not None:
            sums = [cut.reduce(x) for x in sums]
        return sums[0], sums[1].detach()

    @torch.no_grad()
    def reference_logps(
        self, batch: Batch, response: torch.Tensor, segment: torch.Tensor, split: str, indices: list[int]
    ) -> torch.Tensor:
        """(2P,) reference sequence log-probs: chosen sides, then rejected."""
        if self.tables is not None:
            return self.tables[split][indices].T.reshape(-1).to(batch.input_ids.device)
        logp = reference_logprobs(self.engine, self.reference, batch.input_ids, batch.model_mask, 1.0, self.fused,
                                  batch.position_ids)  # fmt: skip
        return segment_sums(logp, response, segment, 2 * len(indices))


def pair_batch(items: list, pad_id: int, device: torch.device) -> tuple[Batch, torch.Tensor, torch.Tensor, int]:
    """(batch, response, segment, pairs) of pairs or packed rows of pairs, on `device`."""
    packed = bool(items) and isinstance(items[0], list)
    batch, response, segment = (collate_packed_dpo if packed else collate_dpo_pairs)(items, pad_id)
    n = sum(len(row) for row in items) if packed else len(items)
    return batch.to(device), response.to(device), segment.to(device), n


def main(cfg: DPOConfig) -> dict:
    start(cfg)
    check_config(cfg)
    dpo = cfg.dpo
    tokenizer = load_tokenizer(cfg.model)
    data_args = (tokenizer, cfg.data, cfg.train.seed, False, data_cache(cfg))
    train_set, eval_set, stats = load_preference_data(*data_args, prompt_first=True)
    dist.print0(f"train: {stats['train'].summary()}\neval: {stats['eval'].summary()}")
    pairs = train_set  # per pair: what reference tables are indexed by
    if cfg.data.packing:  # whole pairs per row, as for the RM; evaluation stays unpacked
        train_set = PackedDataset(train_set, cfg.data.max_length)
        dist.print0(f"packing: {len(train_set)} rows, {train_set.efficiency(cfg.data.max_length):.1%} filled")
    eval_rows = read_rows(dpo.eval_prompts)[: cfg.eval.num_generate] if cfg.eval.num_generate > 0 else []
    model = load_model(cfg.model, tokenizer)
    make_trainable(model, cfg.lora, cfg.model.gradient_checkpointing, name="policy")
    fused = use_fused_loss(cfg.loss.fused, model)
    reference = None
    if reference_kind(cfg).startswith("frozen copy"):
        frozen = load_model(dataclasses.replace(cfg.model, gradient_checkpointing=False), tokenizer)
        reference = frozen_engine(Backbone(frozen), stage_ds_config(cfg), offload=dpo.offload_reference)
    dist.print0(f"reference: {reference_kind(cfg)}")

    mpu = sequence.setup(model, cfg, rows=2, packing=cfg.data.packing)  # None without sequence parallelism
    batches = ShardedBatches(len(train_set), cfg.train.micro_batch_size, *sequence.data_parallel(cfg), cfg.train.seed)
    total_steps = cfg.train.total_steps(batches.per_epoch, cfg.train.gradient_accumulation_steps)
    engine = initialize(Backbone(model), stage_ds_config(cfg), cfg.optim, total_steps, mpu)
    policy = Policy(engine, reference, None, fused, tokenizer.pad_token_id, cfg)
    if reference_kind(cfg) == "precomputed":  # before a checkpoint is loaded: the engine still holds the start
        policy.tables = {split: precompute(policy, data) for split, data in (("train", pairs), ("eval", eval_set))}

    run = Run(cfg, engine, total_steps, fingerprint(tokenizer, cfg.data.train_files))
    before, after = run.train(
        lambda: train(run, policy, train_set, batches),
        lambda: evaluate(policy, eval_set, eval_rows, tokenizer),
    )
    if cfg.checkpoint.export_hf:
        export(engine, tokenizer, cfg, run.out / "final")
    return run.finish(before, after)


def train(run: Run, policy: Policy, train_set: Examples, batches: ShardedBatches) -> None:
    micro_batches = batches.iterate(run.state.micro_step)
    timer, engine = StepTimer(policy.engine), policy.engine
    while run.training():
        for _ in range(run.cfg.train.gradient_accumulation_steps):
            run.state.micro_step, indices = next(micro_batches)
            items = train_set.examples(indices)
            if isinstance(train_set, PackedDataset):  # the pairs of the packed rows, in row order
                indices = [i for j in indices for i in train_set.rows[j]]
            loss, stats, tokens, slots = policy.loss(items, "train", indices)
            check_finite(loss, run.state.step + 1)
            engine.backward(loss / run.cfg.deepspeed.sequence_parallel_size)  # each shard's 1/SP (engine.sequence)
            engine.step()
            timer.add(tokens, 2 * len(indices), slots, loss=loss, **stats)
        run.end_step(timer.flush, postfix=("loss", "rewards/accuracy"))


@torch.no_grad()
def evaluate(
    policy: Policy, eval_set: Examples, eval_rows: list, tokenizer: PreTrainedTokenizerBase
) -> dict[str, float]:
    """Loss, implicit-reward accuracy and margin over the eval pairs, and greedy exact match on `dpo.eval_prompts`
    (overall and per "task" column). Equal shares per rank, so ZeRO-3's gathers stay in step (a remainder under world
    size is left out)."""
    cfg, engine = policy.cfg, policy.engine
    metrics: dict[str, float] = {}
    engine.eval()
    if eval_set:
        mine = dist.equal_share(list(range(len(eval_set))))
        names = ("loss", "rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected")
        sums = torch.zeros(len(names) + 1, dtype=torch.float64)
        for i in range(0, len(mine), cfg.train.micro_batch_size):
            indices = mine[i : i + cfg.train.micro_batch_size]
            loss, stats, _, _ = policy.loss(eval_set.examples(indices), "eval", indices)
            n = len(indices)
            sums += torch.tensor([loss.item() * n] + [stats[k] * n for k in names[1:]] + [n], dtype=torch.float64)
        *totals, n = dist.all_reduce_sum(sums).tolist()
        metrics |= {f"eval/{k}": v / max(n, 1) for k, v in zip(names, totals, strict=True)}
    if eval_rows:
        answers = greedy_answers(engine, eval_rows, tokenizer, cfg.train.micro_batch_size, cfg.eval.max_new_tokens)
        metrics |= exact_match_by_task(answers, sorted({r.data.get("task") for r in eval_rows} - {None}))
    engine.train()
    return metrics


def precompute(policy: Policy, data: TokenizedDataset) -> torch.Tensor:
    """(len(data), 2) reference log-probs of a tokenized split, from the starting weights (adapters off under LoRA),
    cached under the data cache keyed by the model, the settings that change the numbers, and the split's own cache
    name (which hashes the tokenizer, files and data settings)."""
    cfg = policy.cfg
    key = {
        "model": _model_identity(cfg),
        "dtype": cfg.model.dtype,
        "attn": cfg.model.attn_implementation,
        "fused": policy.fused,
        "data": data.cache_name,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    lora = cfg.lora.enabled

    def logps(indices: list[int]) -> torch.Tensor:
        batch, response, segment, n = pair_batch(data.examples(indices), policy.pad_id, policy.engine.device)
        model = None if lora else policy.engine
        logp = reference_logprobs(policy.engine, model, batch.input_ids, batch.model_mask, 1.0, policy.fused)
        return segment_sums(logp, response, segment, 2 * n).view(2, -1).T

    with torch.no_grad():
        return precomputed(
            data_cache(cfg) / f"dpo-reference-{digest}", len(data), logps, cfg.train.micro_batch_size, key
        )


def _model_identity(cfg: DPOConfig) -> dict:
    """The starting weights: a model directory's files (names, sizes, modification times; hashing gigabytes at every
    start would cost minutes), or the random-init preset or config and seed."""
    if cfg.model.path is None:
        return {"preset": cfg.model.preset, "init_config": cfg.model.init_config, "seed": cfg.train.seed}
    files = sorted(p for p in Path(cfg.model.path).resolve().iterdir() if p.is_file())
    return {
        "path": str(Path(cfg.model.path).resolve()),
        "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }


def reference_kind(cfg: DPOConfig) -> str:
    if cfg.dpo.loss_type == "simpo":
        return "none (simpo is reference-free)"
    if cfg.dpo.precompute_reference:
        return "precomputed"
    if cfg.lora.enabled:
        return "the policy with LoRA adapters off"
    return "frozen copy" + (" (ZeRO-3, parameters offloaded to CPU)" if cfg.dpo.offload_reference else "")


def check_config(cfg: DPOConfig) -> None:
    """What the typed config cannot say."""
    dpo = cfg.dpo
    if dpo.beta <= 0:
        raise ConfigError(f"dpo.beta must be > 0, got {dpo.beta}")
    if not 0.0 <= dpo.label_smoothing < 0.5:
        raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {dpo.label_smoothing}")
    if dpo.label_smoothing and dpo.loss_type not in ("sigmoid", "simpo"):
        raise ConfigError(f"dpo.label_smoothing applies to loss_type sigmoid and simpo, not {dpo.loss_type}")
    if dpo.gamma and dpo.loss_type != "simpo":
        raise ConfigError(f"dpo.gamma (SimPO's target margin) applies to loss_type simpo, not {dpo.loss_type}")
    if cfg.data.truncation == "left":
        raise ConfigError("data.truncation: DPO cuts a long pair's prompt first ('right') or refuses it ('error')")
    if cfg.eval.num_generate > 0 and not dpo.eval_prompts:
        dist.print0("eval: no dpo.eval_prompts, so no exact-match eval (eval pairs only)")
