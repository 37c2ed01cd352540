"""Sequence packing: several samples per row of `data.max_length` tokens, none attending across a boundary.

Rule (next-fit, done once per run with a fixed seed): walk the samples in a seeded random order and append each to the
current row while it fits; a sample that does not fit closes the row and starts the next. Samples are already at most
max_length tokens (the truncation policy ran at tokenization), so every sample fits in an empty row. The packed rows
are then shuffled each epoch like unpacked examples, so resume stays exact. Inside a row, position ids restart at 0
for each sample; the models build a block-diagonal causal mask from them (transformers' packed-sequence path: sdpa,
eager and flex attention; FlashAttention-2's variable-length kernel on GPU), and the first token of every sample is
never a target, so no sample predicts the next one's start.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from distributed_pt.data.collate import Batch, pad
from distributed_pt.data.sft import IGNORE_INDEX, Example

PACKING_SEED = 1234  # packing is fixed for a run (and across resumes); epochs shuffle the packed rows


def pack(lengths: Sequence[int] | np.ndarray, max_length: int, seed: int = PACKING_SEED) -> list[list[int]]:
    """Next-fit in a seeded random order. Returns rows of sample indices, each row's lengths summing to
    <= max_length."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in zip(order.tolist(), np.asarray(lengths)[order].tolist(), strict=True):
        if used + n > max_length and current:  # (a sample longer than max_length gets a row of its own)
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        rows.append(current)
    return rows


def sample_positions(lengths: Sequence[int]) -> torch.Tensor:
    """Position ids restarting at 0 for each sample of a packed row: (sum(lengths),)."""
    return torch.cat([torch.arange(n) for n in lengths]) if len(lengths) else torch.zeros(0, dtype=torch.long)


class PackedDataset:
    """Packed rows over a tokenized dataset (anything with `lengths` and `examples(indices)`); item j is the list of
    samples of row j, in packing order."""

    def __init__(self, base, max_length: int) -> None:
        self.base = base
        self.rows = pack(base.lengths, max_length)

    def __len__(self) -> int:
        return len(self.rows)

    def examples(self, indices: list[int]) -> list[list]:
        return [self.base.examples(self.rows[j]) for j in indices]

    def efficiency(self, max_length: int) -> float:
        """Real tokens over the row slots: sum of lengths / (rows x max_length)."""
        return float(np.asarray(self.base.lengths).sum()) / max(len(self.rows) * max_length, 1)


def collate_packed(rows: list[list[Example]], pad_id: int) -> Batch:
    """Packed rows (each a list of samples) right-padded to the longest row. Position ids restart at each sample
    (padding forms a segment of its own); each sample's first token is never a target, so no sample predicts the
    start of the next."""
    ids = [[t for e in row for t in e.input_ids] for row in rows]
    labels = [[t for e in row for t in [IGNORE_INDEX, *e.labels[1:]]] for row in rows]
    positions = [sample_positions([len(e.input_ids) for e in row]).tolist() for row in rows]
    ids_t, mask = pad(ids, pad_id)
    labels_t, _ = pad(labels, IGNORE_INDEX)
    width = ids_t.size(1)
    pos_t = torch.stack([torch.cat([torch.tensor(p), torch.arange(width - len(p))]) for p in positions])
    return Batch(ids_t, mask, labels_t, pos_t)


def collate_packed_pairs(rows: list[list], pad_id: int) -> tuple[Batch, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed preference pairs (each row a list of `PairExample`s; a pair's chosen then rejected sequence, each its
    own sample). Returns (batch, chosen_at (P, 2), rejected_at (P, 2), margin (P,)): the (row, position) of each
    pair's last chosen / rejected token, where its reward is read."""
    seqs, at, margins = [], [], []
    for r, row in enumerate(rows):
        flat: list[int] = []
        lengths = []
        for pair in row:
            for side in (pair.chosen, pair.rejected):
                flat += side
                lengths.append(len(side))
                at.append((r, len(flat) - 1))
            margins.append(pair.margin)
        seqs.append((flat, lengths))
    ids, mask = pad([flat for flat, _ in seqs], pad_id)
    width = ids.size(1)
    pos = torch.stack([torch.cat([sample_positions(n), torch.arange(width - sum(n))]) for _, n in seqs])
    at_t = torch.tensor(at).view(-1, 2, 2)
    return Batch(ids, mask, torch.full_like(ids, IGNORE_INDEX), pos), at_t[:, 0], at_t[:, 1], torch.tensor(margins)


def collate_packed_dpo(rows: list[list], pad_id: int) -> tuple[Batch, torch.Tensor, torch.Tensor]:
    """Packed preference pairs for DPO (each row a list of `PairExample`s; a pair's chosen then rejected sequence,
    each its own sample). Returns (batch, response (R, T) bool, segment (R, T)), numbered as `collate_dpo_pairs`:
    with P pairs in row order, pair p's chosen side is segment p and its rejected side P + p (padding: -1). A
    response position is one at or past its side's prompt_length, never a sample's first token (it has nothing
    before it in its own sample to be predicted from)."""
    total = sum(len(row) for row in rows)
    seqs, responses, segments, lengths = [], [], [], []
    p = 0
    for row in rows:
        flat: list[int] = []
        response: list[bool] = []
        segment: list[int] = []
        row_lengths = []
        for pair in row:
            for side, seg in ((pair.chosen, p), (pair.rejected, total + p)):
                flat += side
                response += [j >= max(pair.prompt_length, 1) for j in range(len(side))]
                segment += [seg] * len(side)
                row_lengths.append(len(side))
            p += 1
        seqs.append(flat)
        responses.append(response)
        segments.append(segment)
        lengths.append(row_lengths)
    ids, mask = pad(seqs, pad_id)
    width = ids.size(1)
    pos = torch.stack([torch.cat([sample_positions(n), torch.arange(width - sum(n))]) for n in lengths])
    response_t = pad([[int(r) for r in resp] for resp in responses], 0)[0].bool()
    segment_t = pad(segments, -1)[0]
    return Batch(ids, mask, torch.full_like(ids, IGNORE_INDEX), pos), response_t, segment_t
