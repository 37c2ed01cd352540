"""Chunked LM head + cross-entropy (SFT): ``fused_linear_cross_entropy``, hidden (N, H) @ weight (V, H)^T, never an
N x V tensor.

* Split of work. cuBLAS (``torch.mm``/``addmm``) does the three GEMMs of each chunk: logits = X_c W^T (+ b),
  dX_c = G_c W and dW += G_c^T X_c (the loop of ``kernels/_linear_chunks.py``). The CE row kernel of
  ``kernels/cross_entropy.py`` does everything vocab-wide in between and writes the gradient G = dloss/dlogits in
  place over the logits, so the chunk's logits buffer is the only vocab-sized temporary.
* Gradient in the forward (Liger-style): with reduction "mean"/"sum" the upstream gradient is a scalar, so the forward
  computes dX and dW chunk by chunk and the backward only scales them in place: 3 GEMMs instead of the 4 that
  recomputing the logits in the backward costs. The price is holding dX (N, H) and dW (V, H) from forward to backward.
  reduction "none" with a trainable weight/bias cannot do that (dW needs the per-token upstream gradients), so it
  recomputes the chunks in the backward (4 GEMMs); with only dX needed it stays eager and scales rows in the backward.
* Ignored tokens cost no FLOPs: their rows are selected out (one ``nonzero``) before chunking. That ``nonzero`` is
  the one host sync: the count sizes the chunks. When nothing is ignored the rows are used in place (no gather).
* Chunks: the rule of ``kernels/_linear_chunks.py`` (256 MiB of logits, at least 1024 tokens on CUDA); at 8192 tokens
  x 128256 vocab, bf16: chunks of ~1024 tokens, 245 MiB of logits, plus dW (0.98 GiB) and dX. Measured on an H100
  (2026-11-23, 8192 x 128256, trainable head): 33.7 ms and 1.26 GiB extra (torch 50.5 ms / 11.7 GiB, Liger 63.9 ms /
  1.10 GiB); benchmarks/results/bench_cross_entropy_h100.md.
* dW is accumulated in the weight's dtype across chunks (cuBLAS accumulates each chunk in fp32); db in fp32.
* Limits: labels must lie in [0, V) or be ignore_index (not checked on the device); the saved gradients are scaled in
  place, so a second backward through the same graph raises; under ZeRO-3 the caller passes a gathered weight.

Backends: on CUDA, or under ``TRITON_INTERPRET=1`` (how the CPU tests run the kernels), the Triton row kernel runs. On
CPU without the interpreter the same chunk loop runs the same math in pure torch (fp32 per chunk, still no N x V); it
exists so that CPU callers work, not for speed. ``fused_linear_cross_entropy_reference`` materialises all logits in
float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distributed_pt_kernels._linear_chunks import chunk_rows, flatten_inputs, grads_out, linear_chunks, reference_logits
from distributed_pt_kernels.cross_entropy import _REDUCTIONS, _ce_rows, _reduce

__all__ = ["fused_linear_cross_entropy", "fused_linear_cross_entropy_reference"]


# ------------------------------------------------------------------------------------------ autograd function
class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, ignore_index, reduction, eps, z_loss, softcap, chunk_size, grad_on):
        x, b = flatten_inputs(hidden, weight, bias)
        y = labels.reshape(-1).contiguous()
        idx = (y != ignore_index).nonzero().squeeze(1)  # the one host sync: sizes the chunks and skips ignored rows
        n = idx.numel()
        if n == y.numel():
            idx, y_used = None, y
        else:
            y_used = y.index_select(0, idx)
        # needs_input_grad ignores torch.no_grad(): grad_on (grad mode at the call) keeps eval from paying for dX/dW
        need = tuple(grad_on and k for k in ctx.needs_input_grad[:2]) + (grad_on and ctx.needs_input_grad[3],)
        # "none" with a trainable head needs the per-token upstream gradients inside dW: recompute in backward.
        ctx.deferred = reduction == "none" and (need[1] or need[2])
        eager = tuple(k and not ctx.deferred for k in need)
        scale = torch.full((n,), 1.0 / max(n, 1) if reduction == "mean" else 1.0, device=x.device, dtype=torch.float32)
        loss_rows = torch.empty(n, dtype=torch.float32, device=x.device)
        compute_grad = any(eager)

        def row_fn(logits, start, end):
            grad = logits if compute_grad else None
            _ce_rows(logits, y_used[start:end], loss_rows[start:end], grad, scale[start:end], ignore_index, eps,
                     z_loss, softcap)  # fmt: skip

        chunk = chunk_rows(n, weight.shape[0], x.element_size(), x.is_cuda, chunk_size)
        dx, dw, db = linear_chunks(x, weight, b, idx, eager, chunk, row_fn)
        ctx.meta = (hidden.shape, hidden.dtype, None if bias is None else bias.dtype)
        ctx.args = (ignore_index, eps, z_loss, softcap, chunk, need, reduction)
        ctx.consumed = False
        if ctx.deferred:
            ctx.save_for_backward(x, weight, b, idx, y_used)
        else:
            ctx.save_for_backward(dx, dw, db)
        if reduction == "none":
            out = loss_rows if idx is None else loss_rows.new_zeros(y.numel()).index_copy_(0, idx, loss_rows)
            return out.view(labels.shape)
        return loss_rows.sum() / max(n, 1) if reduction == "mean" else loss_rows.sum()

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.consumed:
            raise RuntimeError("fused_linear_cross_entropy: backward through the same graph twice is not supported")
        ctx.consumed = True
        ignore_index, eps, z_loss, softcap, chunk, need, reduction = ctx.args
        if ctx.deferred:
            x, weight, b, idx, y_used = ctx.saved_tensors
            g = grad_out.reshape(-1).float()
            scale = (g if idx is None else g.index_select(0, idx)).contiguous()
            scratch = torch.empty(y_used.numel(), dtype=torch.float32, device=x.device)

            def row_fn(logits, start, end):
                _ce_rows(logits, y_used[start:end], scratch[start:end], logits, scale[start:end], ignore_index, eps,
                         z_loss, softcap)  # fmt: skip

            dx, dw, db = linear_chunks(x, weight, b, idx, need, chunk, row_fn)
        else:  # gradients were computed in forward for a unit upstream gradient: scale in place, no host sync
            dx, dw, db = ctx.saved_tensors
            if dx is not None:
                dx.mul_(grad_out.reshape(-1, 1) if reduction == "none" else grad_out)
            for t in (dw, db):
                if t is not None:
                    t.mul_(grad_out)
        dx, dw, db = grads_out(ctx.meta, dx, dw, db)
        return dx, dw, None, db, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------- public API
def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels`` without materialising all the logits.

    Per non-ignored token, with z = softcap * tanh(logits / softcap) (or the logits) and lse = logsumexp(z):
    loss = (1 - eps) (lse - z_y) + eps (lse - mean_j z_j) + z_loss lse^2  (eps = label_smoothing, as in torch).

    Args:
        hidden: (..., H) bf16, fp16 or fp32; cast to ``weight.dtype`` for the GEMMs if it differs.
        weight: (V, H) LM-head weight. A weight with ``requires_grad=False`` costs no dW GEMM.
        labels: (...) int64 in [0, V) or ``ignore_index``; ignored tokens contribute nothing and cost no FLOPs.
        bias: optional (V,).
        ignore_index: label value to skip.
        reduction: "mean" (over non-ignored tokens; 0 when there are none), "sum", or "none".
        label_smoothing: eps in [0, 1].
        z_loss: coefficient of lse^2.
        softcap: optional logit soft-capping value (Gemma-style).
        chunk_size: tokens per chunk; default from the chunk rule of ``kernels/_linear_chunks.py``.

    Returns:
        fp32 scalar for "mean"/"sum"; fp32 (...) per-token losses (0 where ignored) for "none".
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return _FusedLinearCrossEntropy.apply(
        hidden, weight, labels, bias, ignore_index, reduction, float(label_smoothing), float(z_loss), softcap,
        chunk_size, torch.is_grad_enabled(),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------- torch reference
def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``fused_linear_cross_entropy`` with all (N, V) logits materialised in ``dtype``; result in ``dtype``."""
    z = reference_logits(hidden, weight, bias, softcap, dtype).reshape(-1, weight.shape[0])
    y = labels.reshape(-1)
    valid = y != ignore_index
    loss = F.cross_entropy(z, y, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    loss = loss + z_loss * torch.where(valid, torch.logsumexp(z, -1) ** 2, 0.0)
    return _reduce(loss, valid, reduction, labels.shape)
