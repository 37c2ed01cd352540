"""Helpers shared by the kernel modules: interpreter detection, when to launch Triton, the launch settings and softcap
helpers of the vocab-row kernels (cross_entropy, fused_linear_logprobs), and the dtype → tolerance table of the kernel
tests (tests/kernels/).

Importing this module runs a ``@triton.jit`` decoration, like every kernel module: set ``TRITON_INTERPRET`` before the
first ``kernels.*`` import (``kernels/__init__.py`` imports nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Read once, with triton's own parsing of TRITON_INTERPRET (1/true/yes/on/y): @triton.jit chooses between compiled
# and interpreted functions when its decorators run, and every kernel module imports this one before its first one.
INTERPRET: bool = bool(triton.knobs.runtime.interpret)


def use_triton(t: torch.Tensor) -> bool:
    """Whether the vocab-row kernels run for ``t``: on CUDA, or interpreted (CPU tests). Otherwise their launchers run
    the same math in pure torch, so that CPU callers work (not for speed)."""
    return t.is_cuda or INTERPRET


# ------------------------------------------------------------------------------------------------ vocab-row kernels
# One program per row streams the row's V logits in blocks of BLOCK_V (online max / logsumexp in fp32).
# GPU: not measured (no sweep on any GPU; the H100 run of benchmarks/results/bench_cross_entropy_h100.md, 2026-11-23,
# timed the whole op with these values only). Chosen so that 8192 fp32 over 16 warps keeps 16 values per thread with
# headroom for 2+ programs per SM. Blocks under 4096 (vocabularies under 4096) take 4 warps: not measured either.
GPU_BLOCK_V, GPU_NUM_WARPS = 8192, 16
# Interpreter (CPU): measured on the 2-core CPU machine (2026-12-03; 64 tokens, hidden 32, fused CE + log-probs forward
# and backward): vocab 50257 took 2.0 s with 8192-blocks, 0.58 s with 65536, 0.67 s with 131072; vocab 128256 4.6 s,
# 1.14 s, 1.04 s. Interpreted cost grows with loop iterations, so test-sized vocabularies run as one block per row.
INTERPRET_BLOCK_V = 65536


def row_config(V: int) -> dict:
    """Launch settings (BLOCK_V and num_warps) of a vocab-row kernel over rows of V logits."""
    block = min(INTERPRET_BLOCK_V if INTERPRET else GPU_BLOCK_V, triton.next_power_of_2(V))
    return {"BLOCK_V": block, "num_warps": GPU_NUM_WARPS if block >= 4096 else 4}


@triton.jit
def tanh(x):
    # Portable tanh (the interpreter has no libdevice); saturates correctly at +-inf.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


def softcap_torch(raw: torch.Tensor, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softcap * tanh(raw / softcap) and the tanh (for the chain rule), or (raw, None) without a softcap."""
    if softcap is None:
        return raw, None
    t = torch.tanh(raw / softcap)
    return softcap * t, t


# ------------------------------------------------------------------------------------------------ test tolerances
@dataclass(frozen=True)
class Tol:
    rtol: float
    atol: float  # relative to the largest |value| of the reference


# The one table of tests/kernels/: each kernel's output and every gradient against a float64 reference. bf16/fp16: the
# kernels store their 16-bit intermediates (chunk logits and dlogits, GEMM outputs) in the input dtype, as torch does.
TOLERANCES: dict[torch.dtype, Tol] = {
    torch.float32: Tol(rtol=1e-5, atol=1e-5),
    torch.bfloat16: Tol(rtol=2e-2, atol=2e-2),
    torch.float16: Tol(rtol=3e-3, atol=3e-3),
}
