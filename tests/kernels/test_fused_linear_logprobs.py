"""Tests of kernels/fused_linear_logprobs.py against float64 torch references (interpreted on CPU, compiled on a
GPU)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first @triton.jit decoration

import pytest  # noqa: E402

from distributed_pt_kernels import _utils  # noqa: E402
from distributed_pt_kernels import fused_linear_logprobs as fllp  # noqa: E402
from tests.kernels.helpers import (  # noqa: E402
    DEVICE,
    DTYPES,
    assert_close,
    assert_row_kernels_compile_for_h100,
    leaves,
    lm_head_inputs,
)


def _check_logprobs(dtype, softcap, temperature, entropy, lead=(3, 13), v=1001, use=("logp", "entropy")):
    """Log-probs (and entropy) and every gradient vs the float64 reference, random upstream gradients on ``use``."""
    hidden, weight, bias, _ = lm_head_inputs(lead, 32, v, dtype, scale=2.0)
    tokens = torch.randint(0, v, lead, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    h, w, b = leaves(hidden, weight, bias)
    h64, w64, b64 = leaves(hidden, weight, bias, dtype=torch.float64)
    kw = dict(softcap=softcap, temperature=temperature, return_entropy=entropy)
    out = fllp.fused_linear_logprobs(h, w, tokens, b, chunk_size=8, **kw)
    ref = fllp.fused_linear_logprobs_reference(h64, w64, tokens, b64, **kw)
    out, ref = (out, ref) if entropy else ((out,), (ref,))
    gen = torch.Generator().manual_seed(4)
    total, total_ref = 0.0, 0.0
    for name, o, r in zip(("logp", "entropy"), out, ref, strict=False):
        assert o.dtype == torch.float32 and o.shape == lead
        assert_close(o, r, dtype, name)
        if name in use:
            g = torch.randn(lead, generator=gen).to(DEVICE)
            total, total_ref = total + (o * g).sum(), total_ref + (r * g.double()).sum()
    total.backward()
    total_ref.backward()
    for name, ours, theirs in (("hidden", h, h64), ("weight", w, w64), ("bias", b, b64)):
        assert_close(ours.grad, theirs.grad, dtype, f"d{name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logprobs_match_log_softmax_gather(dtype):
    _check_logprobs(dtype, softcap=None, temperature=1.0, entropy=False)


@pytest.mark.parametrize("use", [("logp", "entropy"), ("entropy",)], ids=["both", "entropy_only"])
@pytest.mark.parametrize("softcap,temperature", [(None, 0.6), (4.0, 1.3)])
def test_logprobs_entropy(softcap, temperature, use):
    _check_logprobs(torch.float32, softcap=softcap, temperature=temperature, entropy=True, use=use)


def test_multi_block_rows(monkeypatch):
    # Force several vocab blocks per row so the online max / logsumexp carries across blocks in both row kernels.
    monkeypatch.setattr(_utils, "INTERPRET_BLOCK_V", 256)
    monkeypatch.setattr(_utils, "GPU_BLOCK_V", 256)
    _check_logprobs(torch.float32, softcap=5.0, temperature=0.7, entropy=True, lead=(20,), v=1001)


def test_strided_inputs_vs_plain_torch():
    # RL callers pass views such as input_ids[:, 1:] or every other row: 1-D strided tokens must be read right.
    hidden, weight, _, _ = lm_head_inputs((18,), 16, 300, torch.float32, bias=False)
    tokens = torch.randint(0, 300, (18,)).to(DEVICE)
    hidden, tokens = hidden[::2], tokens[::2]
    logits = hidden @ weight.t()
    expected = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(fllp.fused_linear_logprobs(hidden, weight, tokens), expected)


@pytest.mark.skipif(DEVICE == "cuda", reason="the pure-torch fallback is the CPU path without the interpreter")
def test_torch_fallback_without_interpreter(monkeypatch):
    monkeypatch.setattr(_utils, "INTERPRET", False)
    _check_logprobs(torch.float32, softcap=4.0, temperature=0.8, entropy=True)


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU every test compiles the kernels for real")
def test_kernels_compile_for_h100():
    p, f, i, c = "*bf16", "fp32", "i32", "constexpr"
    common = {"stride_l": i, "V": i, "softcap": f, "inv_temp": f, "HAS_SOFTCAP": c, "BLOCK_V": c}
    fwd = {"logits_ptr": p, "tokens_ptr": "*i64", "logp_ptr": "*fp32", "ent_ptr": "*fp32", "lse_ptr": "*fp32"}
    bwd = {"logits_ptr": p, "tokens_ptr": "*i64", "lse_ptr": "*fp32", "ent_ptr": "*fp32", "glp_ptr": "*fp32",
           "gent_ptr": "*fp32"}  # fmt: skip
    kernels = [
        ("_logprob_fwd_kernel", {**fwd, **common, "RETURN_ENT": c}, {"RETURN_ENT": True}),
        ("_logprob_bwd_kernel", {**bwd, **common, "HAS_LP_GRAD": c, "HAS_ENT_GRAD": c},
         {"HAS_LP_GRAD": True, "HAS_ENT_GRAD": True}),
    ]  # fmt: skip
    assert_row_kernels_compile_for_h100("distributed_pt_kernels.fused_linear_logprobs", kernels)
