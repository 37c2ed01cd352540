"""Batching: padded tensors and a deterministic, resumable sharded batch order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from distributed_pt.data.sft import IGNORE_INDEX, Example


class Examples(Protocol):
    """What training reads by index: a tokenized dataset (SFT examples, preference pairs) or its packed rows."""

    def __len__(self) -> int: ...

    def examples(self, indices: list[int]) -> list[Any]: ...


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T), 1 on real tokens
    labels: torch.Tensor  # (B, T), IGNORE_INDEX on prompt and padding
    position_ids: torch.Tensor | None = None  # (B, T) for packed rows: restarting at 0 for each sample
    shifted: bool = False  # labels already aligned with each position's prediction (a sequence-parallel shard)

    def to(self, device) -> Batch:
        moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in vars(self).items()}
        return Batch(**moved)

    @property
    def model_mask(self) -> torch.Tensor | None:
        """The attention mask to give the model: none for packed rows (their position ids isolate the samples)."""
        return None if self.position_ids is not None else self.attention_mask

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.attention_mask.sum())

    @property
    def num_sequences(self) -> int:
        """Samples in the batch (several per packed row)."""
        if self.position_ids is None:
            return len(self.input_ids)
        return int(((self.position_ids == 0) & (self.attention_mask == 1)).sum())

    @property
    def num_targets(self) -> int:
        """Tokens the loss covers (labels shifted by one, unless `shifted` already; IGNORE_INDEX skipped)."""
        return int(((self.labels if self.shifted else self.labels[:, 1:]) != IGNORE_INDEX).sum())


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-pad to the longest example of the batch."""
    ids, mask = pad([e.input_ids for e in examples], pad_id)
    labels, _ = pad([e.labels for e in examples], IGNORE_INDEX)
    return Batch(ids, mask, labels)


def pad(sequences: list[list[int]], value: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest sequence, on the right (training) or the left (generation prompts).

    Returns (padded (B, T), attention_mask (B, T)).
    """
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        out[i, span] = torch.tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return out, mask


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts for generation: (input_ids, attention_mask), each (B, T)."""
    return pad(sequences, pad_id, left=True)


class ShardedBatches:
    """Each epoch: a seeded permutation, sharded across ranks, cut into micro batches (ragged tail dropped).

    The order depends only on (seed, epoch), so a resumed run skips to (epoch, index) and sees the same batches.
    """

    def __init__(self, n: int, micro_batch_size: int, rank: int, world: int, seed: int):
        self.n, self.mbs, self.rank, self.world, self.seed = n, micro_batch_size, rank, world, seed
        self.per_epoch = n // (micro_batch_size * world)
        if self.per_epoch == 0:
            raise ValueError(
                f"{n} training examples are fewer than one global micro batch "
                f"(train.micro_batch_size={micro_batch_size} x {world} ranks)"
            )

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        mine = order[self.rank :: self.world][: self.per_epoch * self.mbs]
        return [mine[i : i + self.mbs] for i in range(0, len(mine), self.mbs)]

    def iterate(self, start_micro_step: int = 0):
        """Yield (micro_step, indices) forever from global micro step `start_micro_step`."""
        step = start_micro_step
        while True:
            epoch, index = divmod(step, self.per_epoch)
            for batch in self.epoch_batches(epoch)[index:]:
                yield step, batch
                step += 1
