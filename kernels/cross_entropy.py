"""Chunked LM-head + cross-entropy (SFT), LM-head + log-probs (RL), and a masked cross-entropy on given logits.

Design of ``fused_linear_cross_entropy`` (hidden (N, H) @ weight (V, H)^T, never an N x V tensor):

* Split of work. cuBLAS (``torch.mm``/``addmm``) does the three GEMMs of each chunk: logits = X_c W^T (+ b),
  dX_c = G_c W and dW += G_c^T X_c. One Triton program per row does everything vocab-wide in between: an online
  max/logsumexp over the row (fp32), the loss, and the gradient G = dloss/dlogits written in place over the logits
  (softmax - one-hot with label smoothing, z-loss 2 z lse softmax, softcap tanh chain rule), so the chunk's logits
  buffer is the only vocab-sized temporary.
* Gradient in the forward (Liger-style): with reduction "mean"/"sum" the upstream gradient is a scalar, so the forward
  computes dX and dW chunk by chunk and the backward only scales them in place: 3 GEMMs instead of the 4 that
  recomputing the logits in the backward costs. The price is holding dX (N, H) and dW (V, H) from forward to backward.
  reduction "none" with a trainable weight/bias cannot do that (dW needs the per-token upstream gradients), so it
  recomputes the chunks in the backward (4 GEMMs); with only dX needed it stays eager and scales rows in the backward.
* Ignored tokens cost no FLOPs: their rows are selected out (one ``nonzero``) before chunking. That ``nonzero`` is
  the one host sync: the count sizes the chunks. When nothing is ignored the rows are used in place (no gather).
* Chunk rule: the chunk's logits (chunk x V in the GEMM dtype) target ``_CHUNK_LOGITS_BYTES`` = 256 MiB, but never
  fewer than 1024 tokens on CUDA: below that the dW += G^T X GEMM (K = chunk) is bound by reading and writing dW,
  which is what makes a 256-token chunking slow. Chunks are then balanced (no small tail). At 8192 tokens x 128256
  vocab, bf16: chunks of ~1024 tokens, 245 MiB of logits, plus dW (0.98 GiB) and dX; ``chunk_size=`` trades speed
  for memory (256 uses about what Liger uses). Measured on an H100 (2026-11-23, 8192 x 128256, trainable head):
  33.7 ms and 1.26 GiB extra (torch 50.5 ms / 11.7 GiB, Liger 63.9 ms / 1.10 GiB); benchmarks/results/
  bench_cross_entropy_h100.md.
* dW is accumulated in the weight's dtype across chunks (cuBLAS accumulates each chunk in fp32); db in fp32.
* Limits: labels must lie in [0, V) or be ignore_index (not checked on the device); the saved gradients are scaled in
  place, so a second backward through the same graph raises; under ZeRO-3 the caller passes a gathered weight.

``fused_linear_logprobs`` (RL) returns log pi(token) and optionally the entropy for every position (no ignore index,
so no host sync). Its upstream gradients are per token, so its backward recomputes the chunks (4 GEMMs with a
trainable head, 3 frozen); the entropy is differentiable.

Backends: on CUDA, or under ``TRITON_INTERPRET=1`` (how the CPU tests run the kernels), the Triton kernels run. On
CPU without the interpreter the same chunk loop runs the same math in pure torch (fp32 per chunk, still no N x V);
it exists so that CPU callers work, not for speed. The ``*_reference`` functions materialise all logits in float64.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# Read once: @triton.jit decides between compiled and interpreted functions when the decorators run (import time).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_CHUNK_LOGITS_BYTES = 256 * 2**20
_MIN_CHUNK_CUDA = 1024
# Row kernels stream V in blocks. GPU values are untuned (no H100 measurement yet): 8192 fp32 per block over 16
# warps keeps 16 values per thread with headroom for 2+ programs per SM. The interpreter wants few, large blocks.
_GPU_BLOCK_V, _GPU_NUM_WARPS = 8192, 16
_INTERPRET_BLOCK_V = 65536
_REDUCTIONS = ("mean", "sum", "none")


@triton.jit
def _tanh(x):
    # Portable tanh (the interpreter has no libdevice); saturates correctly at +-inf.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _ce_kernel(
    logits_ptr, grad_ptr, labels_ptr, loss_ptr, scale_ptr, stride_l, stride_g, V, ignore_index,
    eps, z_loss, softcap,
    HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """One row: loss[row] and, if COMPUTE_GRAD, grad[row, :] = scale[row] * dloss/dlogits (may alias logits)."""
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * stride_l
    grad_ptr += row * stride_g
    y = tl.load(labels_ptr + row)
    if y == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                tl.store(grad_ptr + offs, tl.zeros([BLOCK_V], tl.float32).to(grad_ptr.dtype.element_ty), offs < V)
        return
    m = float("-inf")
    s = 0.0
    z_sum = 0.0
    for start in range(0, V, BLOCK_V):  # pass 1: online max / sum of exp, fp32
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(logits_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        z_sum += tl.sum(tl.where(mask, z, 0.0), 0)
        m = m_new
    lse = m + tl.log(s)
    z_y = tl.load(logits_ptr + y).to(tl.float32)
    if HAS_SOFTCAP:
        z_y = softcap * _tanh(z_y / softcap)
    loss = (1.0 - eps) * (lse - z_y) + eps * (lse - z_sum / V) + z_loss * lse * lse
    tl.store(loss_ptr + row, loss)
    if COMPUTE_GRAD:  # pass 2: g = scale * (p (1 + 2 z_loss lse) - eps / V - (1 - eps) onehot) [* (1 - tanh^2)]
        scale = tl.load(scale_ptr + row)
        coef = 1.0 + 2.0 * z_loss * lse
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < V
            z = tl.load(logits_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = _tanh(z / softcap)
                z = softcap * t
            g = tl.exp(z - lse) * coef - eps / V - tl.where(offs == y, 1.0 - eps, 0.0)
            g = g * scale
            if HAS_SOFTCAP:
                g = g * (1.0 - t * t)
            tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _logprob_fwd_kernel(
    logits_ptr, tokens_ptr, logp_ptr, ent_ptr, lse_ptr, stride_l, V, softcap, inv_temp,
    HAS_SOFTCAP: tl.constexpr, RETURN_ENT: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """One row of z = softcap(logits) / T: logp = z[token] - lse, entropy = lse - sum(p z), lse saved for backward."""
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * stride_l
    m = float("-inf")
    s = 0.0
    sz = 0.0  # sum exp(z - m) * z, rescaled with s
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(logits_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        z = tl.where(mask, z * inv_temp, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        s = s * alpha + tl.sum(e, 0)
        if RETURN_ENT:
            sz = sz * alpha + tl.sum(e * tl.where(mask, z, 0.0), 0)
        m = m_new
    lse = m + tl.log(s)
    tok = tl.load(tokens_ptr + row)
    z_t = tl.load(logits_ptr + tok).to(tl.float32)
    if HAS_SOFTCAP:
        z_t = softcap * _tanh(z_t / softcap)
    tl.store(logp_ptr + row, z_t * inv_temp - lse)
    tl.store(lse_ptr + row, lse)
    if RETURN_ENT:
        tl.store(ent_ptr + row, lse - sz / s)


@triton.jit
def _logprob_bwd_kernel(
    logits_ptr, tokens_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, stride_l, V, softcap, inv_temp,
    HAS_SOFTCAP: tl.constexpr, HAS_LP_GRAD: tl.constexpr, HAS_ENT_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """In place: logits[row] <- g_lp (onehot - p) - g_ent p (log p + H), through the temperature and softcap."""
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * stride_l
    tok = tl.load(tokens_ptr + row)
    lse = tl.load(lse_ptr + row)
    g_lp = 0.0
    if HAS_LP_GRAD:
        g_lp = tl.load(glp_ptr + row)
    if HAS_ENT_GRAD:
        g_ent = tl.load(gent_ptr + row)
        ent = tl.load(ent_ptr + row)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(logits_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            t = _tanh(z / softcap)
            z = softcap * t
        z = z * inv_temp
        p = tl.exp(z - lse)
        g = g_lp * (tl.where(offs == tok, 1.0, 0.0) - p)
        if HAS_ENT_GRAD:
            g -= g_ent * p * (z - lse + ent)
        g = g * inv_temp
        if HAS_SOFTCAP:
            g = g * (1.0 - t * t)
        tl.store(logits_ptr + offs, g.to(logits_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------- row launchers
def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or _INTERPRET


def _launch_cfg(V: int) -> dict:
    block = min(_INTERPRET_BLOCK_V if _INTERPRET else _GPU_BLOCK_V, triton.next_power_of_2(V))
    return {"BLOCK_V": block, "num_warps": _GPU_NUM_WARPS if block >= 4096 else 4}


def _softcap_torch(raw: torch.Tensor, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if softcap is None:
        return raw, None
    t = torch.tanh(raw / softcap)
    return softcap * t, t


def _ce_rows(logits, labels, loss_out, grad, scale, ignore_index, eps, z_loss, softcap) -> None:
    """Per-row CE of logits (n, V) into loss_out (n,) fp32; grad (n, V) <- scale[:, None] * dloss/dlogits if given."""
    n, V = logits.shape
    if n == 0:
        return
    if _use_triton(logits):
        g = logits if grad is None else grad
        _ce_kernel[(n,)](
            logits, g, labels, loss_out, loss_out if scale is None else scale, logits.stride(0), g.stride(0), V,
            ignore_index, eps, z_loss, softcap or 1.0,
            HAS_SOFTCAP=softcap is not None, COMPUTE_GRAD=grad is not None, **_launch_cfg(V),
        )  # fmt: skip
        return
    z, t = _softcap_torch(logits.float(), softcap)
    lse = torch.logsumexp(z, 1)
    valid = labels != ignore_index
    y = torch.where(valid, labels, 0).unsqueeze(1)
    loss = (1 - eps) * (lse - z.gather(1, y).squeeze(1)) + eps * (lse - z.mean(1)) + z_loss * lse * lse
    loss_out.copy_(torch.where(valid, loss, 0.0))
    if grad is not None:
        g = torch.exp(z - lse[:, None]) * (1 + 2 * z_loss * lse)[:, None] - eps / V
        g.scatter_add_(1, y, torch.full(y.shape, eps - 1.0, dtype=g.dtype, device=g.device))
        g *= torch.where(valid, scale, 0.0)[:, None]
        grad.copy_(g if t is None else g * (1 - t * t))


def _logprob_rows(logits, tokens, logp, ent, lse, softcap, temperature) -> None:
    """Per-row log p(token), entropy (if ent is not None) and lse of softcap(logits) / T; all outputs (n,) fp32."""
    n, V = logits.shape
    if n == 0:
        return
    if _use_triton(logits):
        _logprob_fwd_kernel[(n,)](
            logits, tokens, logp, lse if ent is None else ent, lse, logits.stride(0), V, softcap or 1.0,
            1.0 / temperature, HAS_SOFTCAP=softcap is not None, RETURN_ENT=ent is not None, **_launch_cfg(V),
        )  # fmt: skip
        return
    z = _softcap_torch(logits.float(), softcap)[0] / temperature
    lse.copy_(torch.logsumexp(z, 1))
    logp.copy_(z.gather(1, tokens.unsqueeze(1)).squeeze(1) - lse)
    if ent is not None:
        ent.copy_(lse - (torch.softmax(z, 1) * z).sum(1))


def _logprob_grad_rows(logits, tokens, lse, ent, g_lp, g_ent, softcap, temperature) -> None:
    """In place: logits (n, V) <- d(sum g_lp logp + g_ent entropy)/dlogits; g_lp / g_ent (n,) fp32 or None."""
    n, V = logits.shape
    if n == 0:
        return
    if _use_triton(logits):
        _logprob_bwd_kernel[(n,)](
            logits, tokens, lse, lse if ent is None else ent, lse if g_lp is None else g_lp,
            lse if g_ent is None else g_ent, logits.stride(0), V, softcap or 1.0, 1.0 / temperature,
            HAS_SOFTCAP=softcap is not None, HAS_LP_GRAD=g_lp is not None, HAS_ENT_GRAD=g_ent is not None,
            **_launch_cfg(V),
        )  # fmt: skip
        return
    zc, t = _softcap_torch(logits.float(), softcap)
    z = zc / temperature
    p = torch.exp(z - lse[:, None])
    g = torch.zeros_like(z)
    if g_lp is not None:
        g = -g_lp[:, None] * p
        g.scatter_add_(1, tokens.unsqueeze(1), g_lp.unsqueeze(1))
    if g_ent is not None:
        g -= g_ent[:, None] * p * (z - lse[:, None] + ent[:, None])
    g /= temperature
    logits.copy_(g if t is None else g * (1 - t * t))


# ------------------------------------------------------------------------------------------------- chunk loop
def _chunk_rows(n: int, vocab: int, itemsize: int, is_cuda: bool, chunk_size: int | None) -> int:
    """Rows per chunk: the chunk rule of the module docstring, then balanced so that no chunk is a small tail."""
    if chunk_size is None:
        chunk_size = _CHUNK_LOGITS_BYTES // (vocab * itemsize)
        if is_cuda:
            chunk_size = max(_MIN_CHUNK_CUDA, chunk_size // 256 * 256)
    chunk_size = max(1, min(chunk_size, n))
    n_chunks = triton.cdiv(n, chunk_size) if n else 1
    return triton.cdiv(n, n_chunks) if n else 1


def _linear_chunks(x, weight, bias, idx, need, chunk, row_fn):
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


def _flatten(hidden, weight, bias):
    x = hidden.reshape(-1, hidden.shape[-1])
    x = x if x.dtype == weight.dtype else x.to(weight.dtype)
    b = None if bias is None else bias.to(weight.dtype)
    return x, b


def _grads_out(meta, dx, dw, db):
    """Gradients in the caller's shapes and dtypes; meta = (hidden shape, hidden dtype, bias dtype or None)."""
    shape, dtype, bias_dtype = meta
    return None if dx is None else dx.view(shape).to(dtype), dw, None if db is None else db.to(bias_dtype)


# ------------------------------------------------------------------------------------------ autograd functions
class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, ignore_index, reduction, eps, z_loss, softcap, chunk_size, grad_on):
        x, b = _flatten(hidden, weight, bias)
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

        chunk = _chunk_rows(n, weight.shape[0], x.element_size(), x.is_cuda, chunk_size)
        dx, dw, db = _linear_chunks(x, weight, b, idx, eager, chunk, row_fn)
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

            dx, dw, db = _linear_chunks(x, weight, b, idx, need, chunk, row_fn)
        else:  # gradients were computed in forward for a unit upstream gradient: scale in place, no host sync
            dx, dw, db = ctx.saved_tensors
            if dx is not None:
                dx.mul_(grad_out.reshape(-1, 1) if reduction == "none" else grad_out)
            for t in (dw, db):
                if t is not None:
                    t.mul_(grad_out)
        dx, dw, db = _grads_out(ctx.meta, dx, dw, db)
        return dx, dw, None, db, None, None, None, None, None, None, None


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, tokens, bias, softcap, temperature, return_entropy, chunk_size):
        x, b = _flatten(hidden, weight, bias)
        t = tokens.reshape(-1).contiguous()
        n = t.numel()
        logp, lse = (torch.empty(n, dtype=torch.float32, device=x.device) for _ in range(2))
        ent = torch.empty_like(logp) if return_entropy else None

        def row_fn(logits, s, e):
            _logprob_rows(logits, t[s:e], logp[s:e], None if ent is None else ent[s:e], lse[s:e], softcap, temperature)

        chunk = _chunk_rows(n, weight.shape[0], x.element_size(), x.is_cuda, chunk_size)
        _linear_chunks(x, weight, b, None, (False, False, False), chunk, row_fn)
        ctx.save_for_backward(x, weight, b, t, lse, ent)
        ctx.meta = (hidden.shape, hidden.dtype, None if bias is None else bias.dtype)
        ctx.args = (softcap, temperature, chunk)
        ctx.set_materialize_grads(False)
        if ent is None:
            return logp.view(tokens.shape)
        return logp.view(tokens.shape), ent.view(tokens.shape)

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        x, weight, b, t, lse, ent = ctx.saved_tensors
        softcap, temperature, chunk = ctx.args
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3])
        g_lp = None if g_logp is None else g_logp.reshape(-1).float().contiguous()
        g_en = None if g_ent is None else g_ent.reshape(-1).float().contiguous()
        if (g_lp is None and g_en is None) or not any(need):
            return (None,) * 8

        def row_fn(logits, s, e):
            _logprob_grad_rows(logits, t[s:e], lse[s:e], None if ent is None else ent[s:e],
                               None if g_lp is None else g_lp[s:e], None if g_en is None else g_en[s:e],
                               softcap, temperature)  # fmt: skip

        dx, dw, db = _linear_chunks(x, weight, b, None, need, chunk, row_fn)
        dx, dw, db = _grads_out(ctx.meta, dx, dw, db)
        return dx, dw, None, db, None, None, None, None


class _MaskedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, reduction):
        z = logits.reshape(-1, logits.shape[-1])
        z = z if z.stride(-1) == 1 else z.contiguous()
        y = labels.reshape(-1).contiguous()
        loss_rows = torch.empty(y.numel(), dtype=torch.float32, device=z.device)
        _ce_rows(z, y, loss_rows, None, None, ignore_index, 0.0, 0.0, None)
        count = (y != ignore_index).sum().clamp(min=1)  # stays on device: no host sync
        ctx.save_for_backward(z, y, count)
        ctx.args = (logits.shape, ignore_index, reduction)
        if reduction == "none":
            return loss_rows.view(labels.shape)
        return loss_rows.sum() / count if reduction == "mean" else loss_rows.sum()

    @staticmethod
    def backward(ctx, grad_out):
        z, y, count = ctx.saved_tensors
        shape, ignore_index, reduction = ctx.args
        g = grad_out.float()
        if reduction == "none":
            scale = g.reshape(-1).contiguous()
        else:
            scale = (g / count if reduction == "mean" else g).expand(y.numel()).contiguous()
        grad = torch.empty_like(z)
        scratch = torch.empty(y.numel(), dtype=torch.float32, device=z.device)
        _ce_rows(z, y, scratch, grad, scale, ignore_index, 0.0, 0.0, None)
        return grad.view(shape), None, None, None


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
        chunk_size: tokens per chunk; default from the chunk rule in the module docstring.

    Returns:
        fp32 scalar for "mean"/"sum"; fp32 (...) per-token losses (0 where ignored) for "none".
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return _FusedLinearCrossEntropy.apply(
        hidden, weight, labels, bias, ignore_index, reduction, float(label_smoothing), float(z_loss), softcap,
        chunk_size, torch.is_grad_enabled(),
    )  # fmt: skip


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log pi(token) (and entropy) of z = softcap(hidden @ weight.T + bias) / temperature, chunked.

    Every position is computed (no ignore index, no host sync): mask the result afterwards. Both outputs are
    differentiable; the backward recomputes the logits chunk by chunk.

    Args:
        hidden: (..., H). weight: (V, H). tokens: (...) int64 in [0, V). bias: optional (V,).
        softcap: optional logit soft-capping, applied before the temperature.
        temperature: sampling temperature T > 0.
        return_entropy: also return the entropy of pi at each position.
        chunk_size: tokens per chunk; default from the chunk rule in the module docstring.

    Returns:
        logp: (...) fp32, and entropy: (...) fp32 when ``return_entropy``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _FusedLinearLogprobs.apply(
        hidden, weight, tokens, bias, softcap, float(temperature), return_entropy, chunk_size
    )


def masked_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy on given logits with a Triton forward and backward (no host sync, fp32 math).

    Args:
        logits: (..., V) any float dtype. labels: (...) int64 in [0, V) or ``ignore_index``.
        ignore_index: label value to skip. reduction: "mean" (0 when all ignored), "sum" or "none".

    Returns:
        fp32 scalar, or fp32 (...) per-token losses (0 where ignored) for "none". The gradient has the logits' dtype.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return _MaskedCrossEntropy.apply(logits, labels, ignore_index, reduction)


# ----------------------------------------------------------------------------------------- torch references
def _reference_logits(hidden, weight, bias, softcap, dtype):
    z = hidden.to(dtype) @ weight.to(dtype).t()
    z = z if bias is None else z + bias.to(dtype)
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def _reduce(loss: torch.Tensor, valid: torch.Tensor, reduction: str, shape: torch.Size) -> torch.Tensor:
    if reduction == "none":
        return loss.view(shape)
    return loss.sum() / valid.sum().clamp(min=1) if reduction == "mean" else loss.sum()


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
    z = _reference_logits(hidden, weight, bias, softcap, dtype).reshape(-1, weight.shape[0])
    y = labels.reshape(-1)
    valid = y != ignore_index
    loss = F.cross_entropy(z, y, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    loss = loss + z_loss * torch.where(valid, torch.logsumexp(z, -1) ** 2, 0.0)
    return _reduce(loss, valid, reduction, labels.shape)


def fused_linear_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``fused_linear_logprobs`` via full logits in ``dtype`` and ``log_softmax(...).gather``."""
    logp_all = torch.log_softmax(_reference_logits(hidden, weight, bias, softcap, dtype) / temperature, -1)
    logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def masked_cross_entropy_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``masked_cross_entropy`` via ``F.cross_entropy`` in ``dtype`` ("mean" of nothing is 0, not NaN)."""
    z, y = logits.to(dtype).reshape(-1, logits.shape[-1]), labels.reshape(-1)
    loss = F.cross_entropy(z, y, ignore_index=ignore_index, reduction="none")
    return _reduce(loss, y != ignore_index, reduction, labels.shape)
