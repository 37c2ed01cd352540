"""Fused LoRA linear layer: ``y = x Wᵀ + s·(drop(x) Aᵀ) Bᵀ (+ bias)`` with a frozen base weight ``W``.

What is fused (Triton) and what is left to cuBLAS (``torch.matmul``):

* forward: ``xa = drop(x) Aᵀ`` (M×r) is a skinny cuBLAS GEMM; the base GEMM ``x Wᵀ`` is a Triton kernel whose epilogue
  loads the ``xa`` tile (BLOCK_M×r) and the ``B`` tile and adds ``s·xa Bᵀ`` (and the bias) to the fp32 accumulator, so
  the LoRA update never makes an extra pass over the (M×n) output.
* backward: ``g = dy B`` (M×r) is a skinny cuBLAS GEMM; ``dx = dy W + s·(g A)`` is the same Triton kernel (one pass
  over ``dy``/``W``, LoRA term in the epilogue); ``dA = s·gᵀ drop(x)`` and ``dB = s·dyᵀ xa`` are skinny cuBLAS GEMMs.
  ``dA`` reads ``x`` and ``dB`` reads ``dy``: they share no large operand. ``g`` and ``dB`` both read ``dy``; fusing
  them needs a cross-program reduction (atomics or fp32 partial buffers) to save one read of ``dy`` (~20 µs at
  8192×4096 bf16 on an H100, an estimate, not a measurement), so it is left to cuBLAS until measured.
* saved for backward: ``x`` and ``xa`` only (plus the parameters and, with dropout, an integer seed).

Dropout on the LoRA path is regenerated from a seed, never stored: a counter-based Philox mask
(``tl.rand(seed, row·k + col)``) is drawn by ``_dropout_kernel`` to build ``drop(x)`` for ``xa`` (forward) and for
``dA`` (backward, a transient M×k buffer), and recomputed in the ``dx`` kernel's epilogue. The seed comes from
torch's CPU generator (``torch.manual_seed`` and activation checkpointing's RNG replay both cover it) unless
``dropout_seed`` is given.

Numerics: every product accumulates in fp32; bf16/fp16 inputs feed ``tl.dot`` directly on a GPU. Under
``TRITON_INTERPRET=1`` (CPU) tiles are converted to fp32 right after loading, because bf16 arithmetic is broken in the
interpreter; this gives the same products (exact bf16×bf16 in fp32). fp32 inputs use TF32 only when
``torch.backends.cuda.matmul.allow_tf32`` is set, like ``torch.matmul``.

Target on one H100 (8192 tokens, 4096→4096, r=16, bf16, forward+backward): frozen base GEMMs alone 0.80 ms, naive torch
LoRA 1.20 ms, PEFT 2.04 ms; the aim is within 1.10× of the base GEMMs. Measured on an H100 (2026-11-23,
``benchmarks/results/bench_lora_matmul_h100.md``): base GEMMs 0.693 ms, this kernel 0.986 ms (1.42×: target missed),
naive torch 1.116 ms, PEFT 1.120 ms; at 4096→1024 (k/v projections) it is slower than PEFT (1.45× at r=16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from distributed_pt_kernels._utils import INTERPRET

__all__ = ["choose_path", "dropout_keep_mask", "lora_linear", "lora_linear_reference"]

# Tile configs of the fused GEMM, autotuned per (M bucket, P, Q, BLOCK_R) on a GPU.
# GPU list: not measured config by config. The usual Hopper bf16 GEMM shapes (128/256-wide tiles, BLOCK_Q=64, 3-4
# stages, GROUP_M=8); the H100 run (benchmarks/results/bench_lora_matmul_h100.md, 2026-11-23) timed only the autotuned
# kernel (0.986 ms at 8192 tokens, 4096→4096, r=16) and did not record which config won. _prune_configs came out of
# that run: fp32 tiles over the shared memory were compiled in full before failing (first-call autotuning time).
# Interpreter: one config (autotuning needs a driver) of 64-tiles, not chosen by a measurement. Measured since on the
# 2-core CPU machine (2026-12-03, fp32 forward+backward, 32/64/128-tiles): 111x72→130 r=5 272/70/25 ms, 2048x128→128
# r=16 3.6/0.79/0.30 s: 128-tiles would be faster (interpreted cost grows with programs × loop iterations); unchanged.
if INTERPRET:
    _CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_P": 64, "BLOCK_Q": 64, "GROUP_M": 8}, num_warps=4, num_stages=1)]
else:
    _CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_P": bp, "BLOCK_Q": bq, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bp, bq, w, s in [
            (128, 256, 64, 8, 3),
            (256, 128, 64, 8, 3),
            (128, 128, 64, 8, 4),
            (128, 128, 64, 4, 4),
            (64, 256, 64, 4, 4),
            (128, 64, 64, 4, 4),
            (64, 128, 32, 4, 4),  # fp32 inputs: smaller tiles fit shared memory
        ]
    ]
# Elementwise dropout tile (BLOCK_M, BLOCK_K): not measured on any GPU (the H100 benches ran without dropout);
# 32 x 128 is a common elementwise tile. Interpreter: 64 x 64, not measured (few programs).
_DROPOUT_BLOCK = (64, 64) if INTERPRET else (32, 128)


def _prune_configs(configs, named_args, **kwargs):  # noqa: ANN001, ANN003
    """Drop the tile configs whose pipelined operand tiles cannot fit the GPU's shared memory (fp32 inputs): they
    would be compiled in full before failing at launch, the bulk of the first call's autotuning time."""
    if INTERPRET or len(configs) <= 1:
        return configs
    elem = named_args["a_ptr"].element_size()
    limit = triton.runtime.driver.active.utils.get_device_properties(torch.cuda.current_device())["max_shared_mem"]

    def smem(c):  # noqa: ANN001, ANN202
        k = c.kwargs
        return (k["BLOCK_M"] + k["BLOCK_P"]) * k["BLOCK_Q"] * elem * max(c.num_stages, 1)

    fit = [c for c in configs if smem(c) <= limit]
    return fit or [min(configs, key=smem)]


# ----------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _keep_mask(seed, rows, cols, n_cols, p):
    """Dropout keep-mask of the (rows, cols) tile of an (·, n_cols) matrix: one Philox draw per element index."""
    offsets = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    return tl.rand(seed, offsets) >= p


@triton.jit
def _dropout_kernel(
    x_ptr, out_ptr, M, K, stride_xm, stride_xk, p, seed, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[M, K] (contiguous) = x ⊙ keep / (1 - p), keep regenerated from ``seed``."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    inb = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :] * stride_xk, mask=inb, other=0.0)
    x = x.to(tl.float32)
    keep = _keep_mask(seed, rows, cols, K, p)
    out = tl.where(keep, x * (1.0 / (1.0 - p)), 0.0)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=inb)


@triton.autotune(
    configs=_CONFIGS, key=["M_BUCKET", "P", "Q", "BLOCK_R"], prune_configs_by={"early_config_prune": _prune_configs}
)
@triton.jit
def _lora_matmul_kernel(
    a_ptr, b_ptr, c_ptr, d_ptr, bias_ptr, out_ptr,
    M, P, Q, R, M_BUCKET,
    stride_am, stride_aq, stride_bq, stride_bp, stride_cm, stride_cr, stride_dr, stride_dp, stride_om, stride_op,
    scale, p_drop, seed,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """out[M, P] = a[M, Q] @ b[Q, P] + scale·(c[M, R] @ d[R, P]) (⊙ keep/(1-p)) (+ bias[P]).

    Forward: a = x, b = Wᵀ, c = xAᵀ, d = Bᵀ. Backward dx: a = dy, b = W, c = dy B, d = A (keep = the dropout mask).
    ``M_BUCKET`` (next power of two of M) is only an autotuning key, so that every new token count does not retune.
    """
    # Grouped program order: GROUP_M row-blocks share each column-block of b while it is hot in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_p = tl.cdiv(P, BLOCK_P)
    num_pid_in_group = GROUP_M * num_pid_p
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_p = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    # Wrap out-of-range rows/columns instead of masking them in the main loop; they are masked on store.
    offs_am = (offs_m % M).to(tl.int64)
    offs_bp = offs_p % P
    offs_q = tl.arange(0, BLOCK_Q)
    a_ptrs = a_ptr + offs_am[:, None] * stride_am + offs_q[None, :] * stride_aq  # [BLOCK_M, BLOCK_Q]
    b_ptrs = b_ptr + offs_q[:, None] * stride_bq + offs_bp[None, :] * stride_bp  # [BLOCK_Q, BLOCK_P]

    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for q in range(0, tl.cdiv(Q, BLOCK_Q)):
        q_left = Q - q * BLOCK_Q
        a = tl.load(a_ptrs, mask=offs_q[None, :] < q_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_q[:, None] < q_left, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_Q * stride_aq
        b_ptrs += BLOCK_Q * stride_bq

    # Epilogue: the rank-r update, r zero-padded to BLOCK_R >= 16 by masking (tl.dot needs dims >= 16).
    offs_r = tl.arange(0, BLOCK_R)
    c = tl.load(
        c_ptr + offs_am[:, None] * stride_cm + offs_r[None, :] * stride_cr, mask=offs_r[None, :] < R, other=0.0
    )  # [BLOCK_M, BLOCK_R]
    d = tl.load(
        d_ptr + offs_r[:, None] * stride_dr + offs_bp[None, :] * stride_dp, mask=offs_r[:, None] < R, other=0.0
    )  # [BLOCK_R, BLOCK_P]
    if UPCAST:
        c = c.to(tl.float32)
        d = d.to(tl.float32)
    if DROPOUT:  # dx only: the mask applies to the LoRA term alone, so it needs its own (BLOCK_M, BLOCK_P) tile
        lora = tl.dot(c, d, input_precision=INPUT_PRECISION)
        keep = _keep_mask(seed, offs_m, offs_p, P, p_drop)
        acc += tl.where(keep, lora * (scale / (1.0 - p_drop)), 0.0)
    else:
        # Accumulate straight into acc (a second fp32 tile would double the epilogue's registers). The scale is
        # folded into c, one extra rounding in 16-bit (exact for power-of-two scales; PEFT rounds s·(xAᵀBᵀ) too).
        c = (c.to(tl.float32) * scale).to(d.dtype)
        acc = tl.dot(c, d, acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_bp).to(tl.float32)[None, :]

    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_p[None, :] * stride_op
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_p[None, :] < P))


# ----------------------------------------------------------------------------------------------------------------------
# Launchers: tensors in, new tensors out
# ----------------------------------------------------------------------------------------------------------------------
def _input_precision(dtype: torch.dtype) -> str:
    """fp32 follows torch.matmul's TF32 switch; for 16-bit inputs the value is ignored by the tensor-core path."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _lora_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    d: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    p_drop: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """a (M, Q) @ b (Q, P) + scale·(c (M, R) @ d (R, P)) [⊙ keep/(1-p) if p_drop > 0] [+ bias (P,)] → (M, P)."""
    (M, Q), (_, P), R = a.shape, b.shape, c.shape[1]
    out = torch.empty((M, P), dtype=a.dtype, device=a.device)
    if M == 0 or P == 0:
        return out
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(P, meta["BLOCK_P"]),)  # noqa: E731
    _lora_matmul_kernel[grid](
        a, b, c, d, bias if bias is not None else out, out,
        M, P, Q, R, triton.next_power_of_2(M),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), d.stride(0), d.stride(1),
        out.stride(0), out.stride(1),
        float(scale), float(p_drop), int(seed),
        HAS_BIAS=bias is not None, DROPOUT=p_drop > 0.0, UPCAST=INTERPRET,
        INPUT_PRECISION=_input_precision(a.dtype), BLOCK_R=max(16, triton.next_power_of_2(R)),
    )  # fmt: skip
    return out


def _dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """x (M, K) ⊙ keep / (1 - p) with the seed's Philox mask → new contiguous (M, K) tensor."""
    M, K = x.shape
    out = torch.empty((M, K), dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    bm, bk = _DROPOUT_BLOCK
    grid = (triton.cdiv(M, bm), triton.cdiv(K, bk))
    _dropout_kernel[grid](x, out, M, K, x.stride(0), x.stride(1), float(p), int(seed), BLOCK_M=bm, BLOCK_K=bk)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------------------
# Paths, chosen per layer shape by ``lora_linear(path="auto")``: the fused Triton GEMM, or cuBLAS GEMMs with the
# rank-r term accumulated in place into their output (``addmm_``: one extra pass over the (M, n) output, cheap when n
# is small). On the H100 (bench_lora_matmul_h100.md, 2026-11-23) the fused kernel beat PEFT and naive torch on
# 4096→4096 and 4096↔14336 but lost to both on the narrow-output 4096→1024 (0.91-1.82× PEFT): narrow outputs
# (n < k / 2: GQA key/value projections) take the cuBLAS path. Not yet measured on a GPU with this choice.
NARROW_OUTPUT = 0.5


def choose_path(n: int, k: int) -> str:
    """ "cublas" for narrow outputs (n < NARROW_OUTPUT * k), else "fused"."""
    return "cublas" if n < NARROW_OUTPUT * k else "fused"


class _LoRALinearFunction(torch.autograd.Function):
    """Autograd for ``lora_linear`` on flattened inputs; ``weight`` never receives a gradient. Both paths save only
    ``x`` and ``xa`` (and the parameters)."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, bias, scale: float, p_drop: float, seed: int, fused: bool):  # noqa: ANN001
        # x: (M, k); weight: (n, k); lora_a: (r, k); lora_b: (n, r); bias: (n,) or None — all in x.dtype.
        xd = _dropout(x, p_drop, seed) if p_drop > 0.0 else x
        xa = torch.matmul(xd, lora_a.t())  # (M, r), cuBLAS
        del xd
        if fused:
            y = _lora_matmul(x, weight.t(), xa, lora_b.t(), scale, bias)  # (M, n)
        else:
            y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.matmul(x, weight.t())
            y.addmm_(xa, lora_b.t(), alpha=scale)
        ctx.save_for_backward(x, xa, weight, lora_a, lora_b)
        ctx.scale, ctx.p_drop, ctx.seed, ctx.fused = scale, p_drop, seed, fused
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001
        x, xa, weight, lora_a, lora_b = ctx.saved_tensors
        s, p, seed = ctx.scale, ctx.p_drop, ctx.seed
        need_dx, _, need_da, need_db, need_dbias = ctx.needs_input_grad[:5]
        dx = da = db = dbias = None
        g = torch.matmul(dy, lora_b) if (need_dx or need_da) else None  # (M, r), cuBLAS
        if need_dx and ctx.fused:
            dx = _lora_matmul(dy, weight, g, lora_a, s, p_drop=p, seed=seed)  # (M, k)
        elif need_dx and p > 0.0:  # the LoRA path's input gradient goes back through the same dropout mask
            dx = torch.matmul(dy, weight).add_(_dropout(torch.matmul(g, lora_a).mul_(s), p, seed))
        elif need_dx:
            dx = torch.matmul(dy, weight).addmm_(g, lora_a, alpha=s)
        if need_da:
            xd = _dropout(x, p, seed) if p > 0.0 else x
            da = torch.matmul(g.t(), xd).mul_(s)  # (r, k)
        if need_db:
            db = torch.matmul(dy.t(), xa).mul_(s)  # (n, r)
        if need_dbias and ctx.has_bias:
            dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype)
        return dx, None, da, db, dbias, None, None, None, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
    *,
    dropout_seed: int | None = None,
    path: str = "auto",
) -> torch.Tensor:
    """LoRA linear layer ``y = x Wᵀ + scale·(dropout(x) Aᵀ) Bᵀ + bias`` with fused Triton GEMMs.

    Args:
        x: (..., k) input; fp32, bf16 or fp16; any strides.
        weight: (n, k) frozen base weight; it never receives a gradient (an error if it requires one).
        lora_a: (r, k) LoRA down-projection A.
        lora_b: (n, r) LoRA up-projection B.
        scale: LoRA scaling ``alpha / r``.
        bias: optional (n,) base bias; gets a gradient when it requires one.
        dropout_p: dropout probability on the LoRA path's input (applied only when ``training``).
        training: whether dropout is active.
        dropout_seed: Philox seed of the dropout mask; None draws one from torch's CPU generator.
        path: "fused" (the Triton GEMM with the LoRA term in its epilogue), "cublas" (cuBLAS GEMMs, the LoRA term
            accumulated in place), or "auto" (`choose_path`: cuBLAS for narrow outputs).

    Returns:
        (..., n) output in x's dtype. Parameters in another dtype (e.g. fp32 LoRA weights with bf16 activations) are
        cast to x's dtype for the products; their gradients come back in their own dtype.
    """
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("lora_linear treats `weight` as frozen, but weight.requires_grad=True; freeze it first")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    k, dtype = x.shape[-1], x.dtype
    n, r = weight.shape[0], lora_a.shape[0]
    if weight.shape != (n, k) or lora_a.shape != (r, k) or lora_b.shape != (n, r):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}")  # fmt: skip
    if path not in ("auto", "fused", "cublas"):
        raise ValueError(f"path must be 'auto', 'fused' or 'cublas', got {path!r}")
    fused = (choose_path(n, k) if path == "auto" else path) == "fused"
    p = float(dropout_p) if training else 0.0
    seed = 0
    if p > 0.0:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if dropout_seed is None else int(dropout_seed)
    y = _LoRALinearFunction.apply(
        x.reshape(-1, k),
        weight.to(dtype),
        lora_a.to(dtype),
        lora_b.to(dtype),
        None if bias is None else bias.to(dtype),
        float(scale),
        p,
        seed,
        fused,
    )
    return y.reshape(*x.shape[:-1], n)


def dropout_keep_mask(shape: tuple[int, int], p: float, seed: int, device: torch.device | str) -> torch.Tensor:
    """The boolean keep-mask that ``lora_linear`` uses for a given seed (for tests and debugging).

    Args:
        shape: (M, k), the flattened input's shape.
        p: dropout probability.
        seed: the ``dropout_seed`` passed to (or drawn by) ``lora_linear``.
        device: where to build it.

    Returns:
        (M, k) bool tensor, True where the element is kept.
    """
    ones = torch.ones(shape, dtype=torch.float32, device=device)
    return _dropout(ones, p, seed) != 0


# ----------------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------------
def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
    *,
    dropout_mask: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Pure-torch LoRA linear, differentiable in every input; same arguments as ``lora_linear``.

    Args:
        dropout_mask: optional (..., k) bool keep-mask to use instead of drawing one (only when training with
            ``dropout_p > 0``), e.g. ``dropout_keep_mask`` for the seed the kernel used.
        compute_dtype: dtype to compute in (e.g. torch.float64 for a tight reference); None keeps x's dtype.
        Other arguments as for ``lora_linear``.

    Returns:
        (..., n) output in ``compute_dtype`` (or x's dtype).
    """
    dt = compute_dtype or x.dtype
    x, weight, lora_a, lora_b = x.to(dt), weight.to(dt), lora_a.to(dt), lora_b.to(dt)
    xd = x
    if training and dropout_p > 0.0:
        if dropout_mask is None:
            xd = torch.nn.functional.dropout(x, dropout_p, training=True)
        else:
            xd = x * dropout_mask.reshape(x.shape).to(dt) / (1.0 - dropout_p)
    y = x @ weight.t() + scale * ((xd @ lora_a.t()) @ lora_b.t())
    return y if bias is None else y + bias.to(dt)
