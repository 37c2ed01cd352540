"""Cross-entropy on given logits (``masked_cross_entropy``), and the CE row kernel that ``fused_linear_cross_entropy``
also runs on its chunks of logits.

One Triton program per row does everything vocab-wide: an online max/logsumexp over the row (fp32), the loss, and, if
asked, the gradient dloss/dlogits (softmax - one-hot with label smoothing, z-loss 2 z lse softmax, softcap tanh chain
rule), written to a given buffer or in place over the logits. ``masked_cross_entropy`` has no host sync: the count of
non-ignored tokens stays on the device.

Backends: on CUDA, or under ``TRITON_INTERPRET=1`` (how the CPU tests run the kernels), the Triton kernel runs; on CPU
without the interpreter the same math runs in pure torch (fp32). ``masked_cross_entropy_reference`` uses
``F.cross_entropy`` in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from distributed_pt_kernels._utils import row_config, softcap_torch, tanh, use_triton

__all__ = ["masked_cross_entropy", "masked_cross_entropy_reference"]

_REDUCTIONS = ("mean", "sum", "none")


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
            z = softcap * tanh(z / softcap)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        z_sum += tl.sum(tl.where(mask, z, 0.0), 0)
        m = m_new
    lse = m + tl.log(s)
    z_y = tl.load(logits_ptr + y).to(tl.float32)
    if HAS_SOFTCAP:
        z_y = softcap * tanh(z_y / softcap)
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
                t = tanh(z / softcap)
                z = softcap * t
            g = tl.exp(z - lse) * coef - eps / V - tl.where(offs == y, 1.0 - eps, 0.0)
            g = g * scale
            if HAS_SOFTCAP:
                g = g * (1.0 - t * t)
            tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------- row launcher
def _ce_rows(logits, labels, loss_out, grad, scale, ignore_index, eps, z_loss, softcap) -> None:
    """Per-row CE of logits (n, V) into loss_out (n,) fp32; grad (n, V) <- scale[:, None] * dloss/dlogits if given."""
    n, V = logits.shape
    if n == 0:
        return
    if use_triton(logits):
        g = logits if grad is None else grad
        _ce_kernel[(n,)](
            logits, g, labels, loss_out, loss_out if scale is None else scale, logits.stride(0), g.stride(0), V,
            ignore_index, eps, z_loss, softcap or 1.0,
            HAS_SOFTCAP=softcap is not None, COMPUTE_GRAD=grad is not None, **row_config(V),
        )  # fmt: skip
        return
    z, t = softcap_torch(logits.float(), softcap)
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


# ------------------------------------------------------------------------------------------ autograd function
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


# ----------------------------------------------------------------------------------------- torch reference
def _reduce(loss: torch.Tensor, valid: torch.Tensor, reduction: str, shape: torch.Size) -> torch.Tensor:
    if reduction == "none":
        return loss.view(shape)
    return loss.sum() / valid.sum().clamp(min=1) if reduction == "mean" else loss.sum()


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
