"""Chunked LM head + per-token log-probs (RL): ``fused_linear_logprobs``, log pi(token) and optionally the entropy of
z = softcap(hidden @ weight^T + b) / T at every position, never an N x V tensor.

The chunks of logits come from the loop of ``kernels/_linear_chunks.py`` (cuBLAS GEMMs, same chunk rule as
``fused_linear_cross_entropy``); one Triton program per row does the vocab-wide work: an online max/logsumexp (fp32),
the token's log-prob, the entropy and the lse saved for the backward. There is no ignore index, so no host sync: mask
the result afterwards. The upstream gradients are per token, so the backward recomputes the chunks (4 GEMMs with a
trainable head, 3 frozen) and a second row kernel writes dlogits in place; the entropy is differentiable.

Backends: on CUDA, or under ``TRITON_INTERPRET=1`` (how the CPU tests run the kernels), the Triton kernels run. On CPU
without the interpreter the same chunk loop runs the same math in pure torch (fp32 per chunk, still no N x V); it
exists so that CPU callers work, not for speed. ``fused_linear_logprobs_reference`` materialises all logits in
float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from distributed_pt_kernels._linear_chunks import chunk_rows, flatten_inputs, grads_out, linear_chunks, reference_logits
from distributed_pt_kernels._utils import row_config, softcap_torch, tanh, use_triton

__all__ = ["fused_linear_logprobs", "fused_linear_logprobs_reference"]


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
            z = softcap * tanh(z / softcap)
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
        z_t = softcap * tanh(z_t / softcap)
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
            t = tanh(z / softcap)
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
def _logprob_rows(logits, tokens, logp, ent, lse, softcap, temperature) -> None:
    """Per-row log p(token), entropy (if ent is not None) and lse of softcap(logits) / T; all outputs (n,) fp32."""
    n, V = logits.shape
    if n == 0:
        return
    if use_triton(logits):
        _logprob_fwd_kernel[(n,)](
            logits, tokens, logp, lse if ent is None else ent, lse, logits.stride(0), V, softcap or 1.0,
            1.0 / temperature, HAS_SOFTCAP=softcap is not None, RETURN_ENT=ent is not None, **row_config(V),
        )  # fmt: skip
        return
    z = softcap_torch(logits.float(), softcap)[0] / temperature
    lse.copy_(torch.logsumexp(z, 1))
    logp.copy_(z.gather(1, tokens.unsqueeze(1)).squeeze(1) - lse)
    if ent is not None:
        ent.copy_(lse - (torch.softmax(z, 1) * z).sum(1))


def _logprob_grad_rows(logits, tokens, lse, ent, g_lp, g_ent, softcap, temperature) -> None:
    """In place: logits (n, V) <- d(sum g_lp logp + g_ent entropy)/dlogits; g_lp / g_ent (n,) fp32 or None."""
    n, V = logits.shape
    if n == 0:
        return
    if use_triton(logits):
        _logprob_bwd_kernel[(n,)](
            logits, tokens, lse, lse if ent is None else ent, lse if g_lp is None else g_lp,
            lse if g_ent is None else g_ent, logits.stride(0), V, softcap or 1.0, 1.0 / temperature,
            HAS_SOFTCAP=softcap is not None, HAS_LP_GRAD=g_lp is not None, HAS_ENT_GRAD=g_ent is not None,
            **row_config(V),
        )  # fmt: skip
        return
    zc, t = softcap_torch(logits.float(), softcap)
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


# ------------------------------------------------------------------------------------------ autograd function
class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, tokens, bias, softcap, temperature, return_entropy, chunk_size):
        x, b = flatten_inputs(hidden, weight, bias)
        t = tokens.reshape(-1).contiguous()
        n = t.numel()
        logp, lse = (torch.empty(n, dtype=torch.float32, device=x.device) for _ in range(2))
        ent = torch.empty_like(logp) if return_entropy else None

        def row_fn(logits, s, e):
            _logprob_rows(logits, t[s:e], logp[s:e], None if ent is None else ent[s:e], lse[s:e], softcap, temperature)

        chunk = chunk_rows(n, weight.shape[0], x.element_size(), x.is_cuda, chunk_size)
        linear_chunks(x, weight, b, None, (False, False, False), chunk, row_fn)
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

        dx, dw, db = linear_chunks(x, weight, b, None, need, chunk, row_fn)
        dx, dw, db = grads_out(ctx.meta, dx, dw, db)
        return dx, dw, None, db, None, None, None, None


# ----------------------------------------------------------------------------------------------- public API
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
        chunk_size: tokens per chunk; default from the chunk rule of ``kernels/_linear_chunks.py``.

    Returns:
        logp: (...) fp32, and entropy: (...) fp32 when ``return_entropy``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _FusedLinearLogprobs.apply(
        hidden, weight, tokens, bias, softcap, float(temperature), return_entropy, chunk_size
    )


# ----------------------------------------------------------------------------------------- torch reference
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
    logp_all = torch.log_softmax(reference_logits(hidden, weight, bias, softcap, dtype) / temperature, -1)
    logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    return logp, -(logp_all.exp() * logp_all).sum(-1)
