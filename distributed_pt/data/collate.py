"""Batching: padded tensors and a deterministic, resumable sharded batch order."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distributed_pt.data.sft import IGNORE_INDEX, Example


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE_INDEX on prompt and padding

    def to(self, device) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in (self.input_ids, self.attention_mask, self.labels)))

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-pad to the longest example of the batch."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return Batch(ids, mask, labels)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts for generation: (input_ids, attention_mask), each (B, T)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    return ids, mask


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
