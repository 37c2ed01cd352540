"""Reference log-probs computed in one pass before training (DPO's `dpo.precompute_reference`): no reference model
is in memory while the policy trains.

    table = precomputed(cache, len(pairs), logps_of, batch_size, key)   # (N, 2) float32: chosen, rejected

The pass runs in chunks of `chunk` pairs. In a chunk each rank takes a strided share, padded to the same number of
forwards on every rank (ZeRO-3's gathers stay in step); the shares are summed over ranks and rank 0 writes the chunk
as ``chunk-<i>.npy``, renamed into place whole (``key.json`` says what the cache stands for). A killed pass computes
only the missing chunks when restarted; once all are there a start reads the table and computes nothing. Only rank 0
touches the files (and broadcasts the table), so other nodes need not share its file system.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from distributed_pt import dist

CHUNK = 4096  # pairs per file: what a killed pass loses at most


def precomputed(
    cache: Path,
    n: int,
    logps: Callable[[list[int]], torch.Tensor],
    batch_size: int,
    key: dict[str, Any],
    chunk: int = CHUNK,
) -> torch.Tensor:
    """The (n, 2) float32 table of `logps(indices) -> (len(indices), 2)` over indices 0..n-1, from `cache` when
    complete, else computed (resuming from the chunks already there). `key`: what the cache stands for (its
    directory name should hash it), written beside the chunks."""
    num = math.ceil(n / chunk)
    done = dist.broadcast_object(_done_chunks(cache, key, n, chunk) if dist.is_main() else None)
    todo = [c for c in range(num) if c not in done]
    if todo:
        dist.print0(f"reference log-probs: {n} pairs, {len(done)}/{num} chunks cached, computing the rest -> {cache}")
    rank, world = dist.rank(), dist.world_size()
    for c in tqdm(todo, desc="reference log-probs", unit="chunk", disable=not dist.is_main()):
        lo, hi = c * chunk, min(n, (c + 1) * chunk)
        mine = list(range(lo + rank, hi, world))
        per_rank = math.ceil((hi - lo) / world)
        padded = mine + [mine[-1] if mine else lo] * (per_rank - len(mine))
        out = torch.zeros(hi - lo, 2, dtype=torch.float64)
        for b in range(0, per_rank, batch_size):
            indices = padded[b : b + batch_size]
            values = logps(indices).double().cpu()
            real = max(0, min(len(indices), len(mine) - b))  # the padding repeats are computed, not kept
            out[torch.tensor(indices[:real], dtype=torch.long) - lo] = values[:real]
        out = dist.all_reduce_sum(out)
        if dist.is_main():
            _write(cache / f"chunk-{c:06d}.npy", out.float().numpy())
    if not todo:
        dist.print0(f"reference log-probs: cache hit {cache}")
    table = None
    if dist.is_main():
        table = np.concatenate([np.load(cache / f"chunk-{c:06d}.npy") for c in range(num)]) if num else np.zeros((0, 2))
    return torch.from_numpy(dist.broadcast_object(table)).float()


def _done_chunks(cache: Path, key: dict[str, Any], n: int, chunk: int) -> set[int]:
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "key.json").write_text(json.dumps({"key": key, "n": n, "chunk": chunk}, indent=1, default=str))
    return {int(p.stem.split("-")[1]) for p in cache.glob("chunk-*.npy")}


def _write(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)
