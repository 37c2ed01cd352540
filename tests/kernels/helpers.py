"""Helpers of the kernel tests: the comparison against a float64 reference (tolerances from kernels/_utils.py), inputs
of the LM-head ops, and an sm_90 compile check that needs no GPU.

Import it after setting TRITON_INTERPRET (distributed_pt_kernels._utils reads it once, as the kernels' @triton.jit
decorations do).
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from distributed_pt_kernels._utils import TOLERANCES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = list(TOLERANCES)
IGNORE = -100
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """``actual`` vs a float64 ``expected`` with the tolerance of ``dtype``; atol scales with max |expected|."""
    tol = TOLERANCES[dtype]
    atol = tol.atol * max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual.double(), expected, rtol=tol.rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def lm_head_inputs(lead, h, v, dtype, bias=True, ignore_frac=0.25, scale=1.0, seed=0):
    """hidden (*lead, h), weight (v, h), bias (v,) or None, labels (*lead) with ``ignore_frac`` set to IGNORE."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*lead, h, generator=g) * scale).to(DEVICE, dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(DEVICE, dtype)
    b = (torch.randn(v, generator=g) * 0.1).to(DEVICE, dtype) if bias else None
    labels = torch.randint(0, v, lead, generator=g)
    labels[torch.rand(lead, generator=g) < ignore_frac] = IGNORE
    return hidden, weight, b, labels.to(DEVICE)


def leaves(*ts, dtype=None):
    """Fresh leaf copies (optionally cast) that require grad; None stays None."""
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in ts]


_COMPILE_SCRIPT = """
import ast, importlib, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from distributed_pt_kernels import _utils
module = importlib.import_module(sys.argv[1])
for name, sig, flags in ast.literal_eval(sys.argv[2]):
    consts = {"HAS_SOFTCAP": True, "BLOCK_V": _utils.GPU_BLOCK_V, **flags}
    k = triton.compile(ASTSource(fn=getattr(module, name), signature=sig, constexprs=consts),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": _utils.GPU_NUM_WARPS})
    assert k.asm["cubin"], name
print("compiled")
"""


def assert_row_kernels_compile_for_h100(module: str, kernels: list[tuple[str, dict, dict]]) -> None:
    """Build sm_90 cubins of vocab-row kernels (name, signature, constexpr flags) in a process without the interpreter.

    The interpreter accepts code that does not compile (e.g. tl.dot under 16); triton compiles for a GPU target
    without a GPU present.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-c", _COMPILE_SCRIPT, module, repr(kernels)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
