"""The chunked LM-head loop shared by ``fused_linear_cross_entropy`` and ``fused_linear_logprobs``.

logits = X W^T (+ b) are computed a chunk of rows at a time into one reused buffer (never N x V); a row function (a
vocab-row kernel) turns each chunk's logits into its outputs and, when gradients are wanted, overwrites them in place
with dloss/dlogits; cuBLAS then does the gradient GEMMs dX_c = G_c W and dW += G_c^T X_c.

Chunk rule: the chunk's logits (chunk x V in the GEMM dtype) target ``CHUNK_LOGITS_BYTES`` = 256 MiB, but never fewer
than ``MIN_CHUNK_CUDA`` = 1024 tokens on CUDA: below that the dW += G^T X GEMM (K = chunk) is bound by reading and
writing dW, which is what makes a 256-token chunking slow. Chunks are then balanced (no small tail). At 8192 tokens x
128256 vocab, bf16: chunks of ~1024 tokens, 245 MiB of logits; ``chunk_size=`` trades speed for memory (256 uses about
what Liger uses).
"""

from __future__ import annotations

import torch
import triton

# Not measured against other budgets: a memory budget, ~245 MiB of bf16 logits at 1024 x 128256. In the H100 run
# (benchmarks/results/bench_cross_entropy_h100.md, 2026-11-23) it set the chunk only at vocab 32000 (4096 tokens);
# at 128256 and 151936 MIN_CHUNK_CUDA did.
CHUNK_LOGITS_BYTES = 256 * 2**20
# Measured against 256 only, on an H100 (bench_cross_entropy_h100.md, 2026-11-23, 8192 tokens x vocab 128256 bf16):
# 1024-token chunks 33.7 ms / 1295 MiB (trainable head), 20.2 ms / 329 MiB (frozen) vs chunk_size=256 51.2 ms /
# 1130 MiB and 24.1 ms / 130 MiB. 512 and 2048 were not tried; the dW-bound explanation above is not profiled.
MIN_CHUNK_CUDA = 1024


def chunk_rows(n: int, vocab: int, itemsize: int, is_cuda: bool, chunk_size: int | None) -> int:
    """Rows per chunk: the chunk rule of the module docstring, then balanced so that no chunk is a small tail."""
    if chunk_size is None:
        chunk_size = CHUNK_LOGITS_BYTES // (vocab * itemsize)
        if is_cuda:
            chunk_size = max(MIN_CHUNK_CUDA, chunk_size // 256 * 256)
    chunk_size = max(1, min(chunk_size, n))
    n_chunks = triton.cdiv(n, chunk_size) if n else 1
    return triton.cdiv(n, n_chunks) if n else 1


def linear_chunks(x, weight, bias, idx, need, chunk, row_fn):
    """Run row_fn over chunks of logits = x[idx] @ weight^T (+ bias), then the gradient GEMMs.

    Args:
        x: (N, H) all rows. weight: (V, H), same dtype. bias: (V,) or None. idx: (n,) rows to use, or None for all.
        need: (dx, dw, db) booleans; when any is set, row_fn must overwrite the logits with dloss/dlogits.
        chunk: rows per chunk. row_fn: (logits (c, V), start, end) -> None, start/end index the n used rows.

    Returns:
        dx (N, H) (zero on unused rows) or None, dw (V, H) or None, db (V,) fp32 or None.
    """
    n = x.shape[0] if idx is None else idx.numel()
    need_dx, need_dw, need_db = need
    dx = (x.new_empty if idx is None else x.new_zeros)(x.shape) if need_dx else None
    dw = weight.new_zeros(weight.shape) if need_dw and n == 0 else weight.new_empty(weight.shape) if need_dw else None
    db = torch.zeros(weight.shape[0], dtype=torch.float32, device=x.device) if need_db else None
    buf = x.new_empty(min(chunk, n), weight.shape[0])  # the only vocab-sized temporary, reused by every chunk
    for i, start in enumerate(range(0, n, chunk)):
        end = min(n, start + chunk)
        rows = None if idx is None else idx[start:end]
        xc = x[start:end] if rows is None else x.index_select(0, rows)
        logits = buf[: end - start]
        if bias is None:
            torch.mm(xc, weight.t(), out=logits)
        else:
            torch.addmm(bias, xc, weight.t(), out=logits)
        row_fn(logits, start, end)
        if need_dx:
            if rows is None:
                torch.mm(logits, weight, out=dx[start:end])
            else:
                dx.index_copy_(0, rows, logits @ weight)
        if need_dw:
            if i == 0:
                torch.mm(logits.t(), xc, out=dw)  # beta = 0: no memset of dW
            else:
                dw.addmm_(logits.t(), xc)
        if need_db:
            db += logits.sum(0, dtype=torch.float32)
    return dx, dw, db


def flatten_inputs(hidden, weight, bias):
    """hidden (..., H) → x (N, H) and bias → b, both in the weight's dtype (the GEMM dtype)."""
    x = hidden.reshape(-1, hidden.shape[-1])
    x = x if x.dtype == weight.dtype else x.to(weight.dtype)
    b = None if bias is None else bias.to(weight.dtype)
    return x, b


def grads_out(meta, dx, dw, db):
    """Gradients in the caller's shapes and dtypes; meta = (hidden shape, hidden dtype, bias dtype or None)."""
    shape, dtype, bias_dtype = meta
    return None if dx is None else dx.view(shape).to(dtype), dw, None if db is None else db.to(bias_dtype)


def reference_logits(hidden, weight, bias, softcap, dtype):
    """All logits (..., V) in ``dtype``, soft-capped: the pure-torch references' starting point."""
    z = hidden.to(dtype) @ weight.to(dtype).t()
    z = z if bias is None else z + bias.to(dtype)
    return z if softcap is None else softcap * torch.tanh(z / softcap)
