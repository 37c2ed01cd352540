"""Ulysses sequence parallelism through DeepSpeed (ALST, `deepspeed.runtime.sequence_parallel.ulysses_sp`): each
sequence is split over `deepspeed.sequence_parallel_size` (SP) consecutive ranks. Attention runs on whole sequences
for a share of the heads (DeepSpeed's `UlyssesSPAttentionHF`, two all-to-alls a layer); everything else runs on each
rank's share of the tokens. The SFT stage uses it so far.

Every rank of a sequence-parallel group trains on the same batch (the data-parallel rank is rank // SP). Labels are
shifted before the sequence is cut, so a shard's last position still predicts the next shard's first token; each
rank's loss is its shard's token-loss sum over the step's token count (all-reduced), and DeepSpeed sums gradients over
the group and averages them over the data-parallel replicas.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distributed_pt import dist
from distributed_pt.config import ConfigError
from distributed_pt.data.collate import Batch
from distributed_pt.data.sft import IGNORE_INDEX
from distributed_pt.models.heads import shift_labels


def data_parallel(cfg: Any) -> tuple[int, int]:
    """(this rank's data-parallel rank, the number of data-parallel replicas)."""
    sp = cfg.deepspeed.sequence_parallel_size
    return dist.rank() // sp, dist.world_size() // sp


def setup(model: nn.Module, cfg: Any) -> Any | None:
    """Check the settings and route the model's attention through Ulysses (collective: makes the process groups).
    Returns the groups object (`mpu`) `deepspeed.initialize` takes, or None without sequence parallelism."""
    sp, world = cfg.deepspeed.sequence_parallel_size, dist.world_size()
    if sp < 1:
        raise ConfigError(f"deepspeed.sequence_parallel_size must be >= 1, got {sp}")
    if sp == 1:
        return None
    text = model.config.get_text_config()
    heads, kv_heads = text.num_attention_heads, getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    attn = model.config._attn_implementation
    problems = [
        (heads % sp, f"must divide the attention heads ({heads})"),
        (kv_heads % sp and sp % kv_heads, f"and the key/value heads ({kv_heads}) must divide it or be divisible by it"),
        (attn == "eager", "needs model.attn_implementation sdpa or flash attention, not eager"),
        (cfg.data.packing, "does not support data.packing yet"),
        (world % sp, f"must divide the world size ({world} ranks)"),
    ]
    for bad, why in problems:
        if bad:
            raise ConfigError(f"deepspeed.sequence_parallel_size={sp}: {why}")
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    return UlyssesSPAttentionHF.register_with_transformers(
        model, attn, sp, cfg.train.micro_batch_size, seq_length_is_variable=True, disable_in_eval=True
    )


def shard(batch: Batch, sp: int, sp_rank: int, pad_id: int) -> Batch:
    """This rank's share of a (right-padded) batch's sequence: tokens, their positions and their already-shifted
    targets, the length padded up to a multiple of SP first."""
    extra = -batch.input_ids.size(1) % sp
    ids = F.pad(batch.input_ids, (0, extra), value=pad_id)
    mask = F.pad(batch.attention_mask, (0, extra), value=0)
    targets = F.pad(shift_labels(batch.labels), (0, extra), value=IGNORE_INDEX)
    positions = torch.arange(ids.size(1), device=ids.device).expand_as(ids)
    width = ids.size(1) // sp
    cut = slice(sp_rank * width, (sp_rank + 1) * width)
    return replace(batch, input_ids=ids[:, cut], attention_mask=mask[:, cut], labels=targets[:, cut],
                   position_ids=positions[:, cut].contiguous(), shifted=True)  # fmt: skip
