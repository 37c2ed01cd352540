"""Ulysses sequence parallelism through DeepSpeed (ALST, `deepspeed.runtime.sequence_parallel.ulysses_sp`): each
sequence is split over `deepspeed.sequence_parallel_size` (SP) consecutive ranks. Attention runs on whole sequences
for a share of the heads (DeepSpeed's `UlyssesSPAttentionHF`, two all-to-alls a layer); everything else runs on each
rank's share of the tokens. SFT, DPO, the reward model and the PPO and GRPO updates use it.

Every rank of a sequence-parallel group trains on the same batch (the data-parallel rank is rank // SP). Targets are
shifted before the sequence is cut, so a shard's last position still predicts the next shard's first token. A loss
that is a sum over tokens (SFT) is each rank's shard's sum; a loss of whole-sequence quantities (DPO's sequence
log-probs, a reward model's last-token score, the PPO/GRPO objectives' means) sums each rank's part over the group
(`sum_over_shards`), every rank then holding the group's loss, of which it backpropagates 1/SP (the sums' backward
adds the gradients over the group). DeepSpeed sums the gradients over the group and averages them over the
data-parallel replicas. Ulysses drops the attention mask (attention is causal over the position ids), so batches
must be right-padded. Packed rows (SFT, DPO, RM) keep their samples apart through their position ids, restarting at
each sample and gathered by DeepSpeed: flash attention reads them (variable length), sdpa gets a mask built from them.
In eval mode attention is the model's own, mask included, and the stages run whole sequences.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from distributed_pt import dist
from distributed_pt.config import ConfigError
from distributed_pt.data.collate import Batch
from distributed_pt.data.sft import IGNORE_INDEX
from distributed_pt.models.heads import last_token_index, token_scores

_GROUP: Any = None  # this rank's sequence-parallel process group (set by `setup`)


def data_parallel(cfg: Any) -> tuple[int, int]:
    """(this rank's data-parallel rank, the number of data-parallel replicas)."""
    sp = cfg.deepspeed.sequence_parallel_size
    return dist.rank() // sp, dist.world_size() // sp


def setup(model: nn.Module, cfg: Any, rows: int = 1, packing: bool = False) -> Any | None:
    """Check the settings and route the model's attention through Ulysses (collective: makes the process groups);
    `rows`: sequences per training example (a preference pair's 2); `packing`: the training rows are packed (each
    then one row). Returns the groups object (`mpu`) `deepspeed.initialize` takes, or None without sequence
    parallelism."""
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
        (packing and attn == "flex_attention", "packs rows (data.packing) with sdpa or flash attention only"),
        (world % sp, f"must divide the world size ({world} ranks)"),
    ]
    for bad, why in problems:
        if bad:
            raise ConfigError(f"deepspeed.sequence_parallel_size={sp}: {why}")
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    global _GROUP
    own = ALL_ATTENTION_FUNCTIONS[attn]
    if packing and attn == "sdpa":  # the core attention DeepSpeed calls on whole rows
        ALL_ATTENTION_FUNCTIONS[attn] = within_samples(own)
        dist.print0("packed rows under sequence parallelism on sdpa: a (T, T) mask per row (flash attention: none)")
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model,
        attn,
        sp,
        (1 if packing else rows) * cfg.train.micro_batch_size,
        seq_length_is_variable=True,
        disable_in_eval=True,
    )
    ulysses = ALL_ATTENTION_FUNCTIONS[attn]

    def attention(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        # Eval mode (evaluation, generation): the model's own attention with its mask. DeepSpeed's wrapper drops the
        # mask before it looks at the mode, which breaks left-padded generation.
        return (ulysses if module.training else own)(module, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS[attn] = attention
    _GROUP = mpu.get_sequence_parallel_group()
    return mpu


def within_samples(attention: Callable) -> Callable:
    """sdpa for packed rows under Ulysses, which drops the mask and hands the core attention the whole rows' position
    ids: attention causal within each sample (the position ids restart at 0 for each, padding included)."""

    def core(
        module: nn.Module, query: Any, key: Any, value: Any, attention_mask: Any, *args: Any, **kwargs: Any
    ) -> Any:
        sample = (kwargs["position_ids"] == 0).cumsum(1)
        mask = (sample[:, :, None] == sample[:, None, :]).tril()[:, None]  # (B, 1, T, T)
        return attention(module, query, key, value, mask, *args, **kwargs)

    return core


def split(x: torch.Tensor, sp: int, sp_rank: int, fill: float | bool, length: int | None = None) -> torch.Tensor:
    """This rank's share of `x` (B, L, ...) along the sequence: x padded with `fill` to `length` (default L; a
    sequence's length for per-position values such as next-token targets, L - 1 of them) rounded up to a multiple of
    SP, then cut into SP equal parts."""
    length = length or x.size(1)
    extra = length + (-length % sp) - x.size(1)
    if extra:
        x = torch.cat([x, x.new_full((x.size(0), extra, *x.shape[2:]), fill)], 1)
    width = x.size(1) // sp
    return x[:, sp_rank * width : (sp_rank + 1) * width].contiguous()


@dataclass
class Shard:
    """Cuts a right-padded minibatch of sequences (B, T) and its per-position values (B, T - 1: position t scores
    token t + 1) to this rank's shard; without sequence parallelism (sp 1) it changes nothing."""

    sp: int
    rank: int

    @classmethod
    def of(cls, cfg: Any) -> Shard:
        sp = cfg.deepspeed.sequence_parallel_size
        return cls(sp, dist.rank() % sp)

    def inputs(
        self,
        ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        targets: bool = True,
        position_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """`rl.logprobs.token_logprobs`' keyword inputs: tokens, mask, positions and each position's next token
        (`targets`; without them, `models.heads.token_scores`'). Packed rows: no mask, their `position_ids`. The
        columns added to reach a multiple of SP hold token 0 at position 0: causal attention never lets them reach a
        real token."""
        if self.sp == 1:
            return {"input_ids": ids, "attention_mask": attention_mask, "position_ids": position_ids}
        return {
            "input_ids": split(ids, self.sp, self.rank, 0),
            "attention_mask": None if attention_mask is None else split(attention_mask, self.sp, self.rank, 0),
            "position_ids": positions(ids, self.sp, self.rank, position_ids),
        } | ({"targets": self(ids[:, 1:], 0)} if targets else {})

    def scored(self, x: torch.Tensor) -> torch.Tensor:
        """A scalar head's per-position outputs (B, T; a shard's (B, W)) → per-position values (position t scores
        token t + 1): the last position dropped (a shard keeps it: its next token is in the next shard)."""
        return x[:, :-1] if self.sp == 1 else x

    def __call__(self, x: torch.Tensor | None, fill: float | bool = 0) -> torch.Tensor | None:
        """Per-position values (B, T - 1) → this rank's (B, W); None stays None."""
        return x if x is None or self.sp == 1 else split(x, self.sp, self.rank, fill, x.size(1) + 1)

    @property
    def reduce(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """What sums a quantity over the shards of the sequences (None without sequence parallelism)."""
        return sum_over_shards if self.sp > 1 else None


def gather(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Each tensor's rows from every rank of the sequence-parallel group, in rank order, right-padded with zeros
    along dim 1 to the widest (a GRPO update trains every rank on its group's rollouts)."""
    parts: list[Any] = [None] * torch.distributed.get_world_size(_GROUP)
    torch.distributed.all_gather_object(parts, [None if t is None else t.cpu() for t in tensors], group=_GROUP)
    out = []
    for i, t in enumerate(tensors):
        pieces = [p[i] for p in parts]
        if t is not None and t.dim() > 1:
            width = max(p.size(1) for p in pieces)
            pieces = [torch.cat([p, p.new_zeros(p.size(0), width - p.size(1))], 1) for p in pieces]
        out.append(None if t is None else torch.cat(pieces).to(t.device))
    return out


def positions(ids: torch.Tensor, sp: int, sp_rank: int, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's share of the position ids of rows `ids` (B, T): packed rows' own `position_ids`, else 0, 1, ...
    (right-padded rows, padding included)."""
    if position_ids is not None:
        return split(position_ids, sp, sp_rank, 0)
    width = -(-ids.size(1) // sp)
    return torch.arange(sp_rank * width, (sp_rank + 1) * width, device=ids.device).expand(ids.size(0), -1)


def sum_over_shards(local: torch.Tensor) -> torch.Tensor:
    """The sequence-parallel group's sum of each rank's part (e.g. per-sequence log-prob sums over its shard): the
    same value on every rank of the group. Differentiable, its backward summing the gradients over the group too, so
    a loss built from such sums (nested ones included: GSPO's sequence ratio inside a token sum) is the group's
    loss on every rank, of which each rank backpropagates 1/SP."""
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(local, group=_GROUP)


def sequence_rewards(
    model: nn.Module,
    ids: torch.Tensor,
    attention_mask: torch.Tensor,
    sp: int,
    position_ids: torch.Tensor | None = None,
    at: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N,) scalar-head scores at `at` ((N, 2): row and position; default: each right-padded row's last real token,
    as `models.heads.sequence_rewards`), this rank computing its shard's scores; the rank holding a position gives its
    score to the group. Packed rows: their `position_ids`, the rewards' `at`."""
    cut = Shard(sp, dist.rank() % sp)
    mask = None if position_ids is not None else attention_mask
    scores = token_scores(model, **cut.inputs(ids, mask, targets=False, position_ids=position_ids))
    if at is None:
        at = torch.stack([torch.arange(ids.size(0), device=ids.device), last_token_index(attention_mask)], 1)
    width = scores.size(1)
    col = at[:, 1] - cut.rank * width
    mine = (col >= 0) & (col < width)
    return sum_over_shards(scores[at[:, 0], col.clamp(0, width - 1)] * mine)


def shard(batch: Batch, sp: int, sp_rank: int, pad_id: int) -> Batch:
    """This rank's share of a (right-padded or packed) batch's sequence: tokens, their positions and their
    already-shifted targets, the length padded up to a multiple of SP first."""
    ids = batch.input_ids
    return replace(
        batch,
        input_ids=split(ids, sp, sp_rank, pad_id),
        attention_mask=split(batch.attention_mask, sp, sp_rank, 0),
        labels=split(batch.labels[:, 1:], sp, sp_rank, IGNORE_INDEX, ids.size(1)),
        position_ids=positions(ids, sp, sp_rank, batch.position_ids),
        shifted=True,
    )
