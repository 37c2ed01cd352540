"""Tests of kernels/cross_entropy.py (masked CE on given logits) against float64 torch references (interpreted on CPU,
compiled on a GPU)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first @triton.jit decoration

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from distributed_pt_kernels import _utils  # noqa: E402
from distributed_pt_kernels import cross_entropy as ce  # noqa: E402
from tests.kernels.helpers import (  # noqa: E402
    DEVICE,
    DTYPES,
    IGNORE,
    assert_close,
    assert_row_kernels_compile_for_h100,
    leaves,
    lm_head_inputs,
)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_cross_entropy(dtype, reduction):
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(3, 17, 1001, generator=g) * 4).to(DEVICE, dtype)
    labels = torch.randint(0, 1001, (3, 17), generator=g)
    labels[:, ::4] = IGNORE
    labels = labels.to(DEVICE)
    (z,), (z64,) = leaves(logits), leaves(logits, dtype=torch.float64)
    out = ce.masked_cross_entropy(z, labels, reduction=reduction)
    ref = F.cross_entropy(z64.reshape(-1, 1001), labels.reshape(-1), ignore_index=IGNORE, reduction=reduction)
    ref = ref.view(labels.shape) if reduction == "none" else ref
    assert_close(out, ref, dtype, "loss")
    upstream = torch.rand(out.shape, generator=g).to(DEVICE)
    out.backward(upstream)
    ref.backward(upstream.double())
    assert z.grad.dtype == dtype
    assert_close(z.grad, z64.grad, dtype, "dlogits")


def test_all_ignored_gives_zero_loss_and_grad():
    hidden, weight, _, labels = lm_head_inputs((2, 5), 16, 1001, torch.float32, ignore_frac=1.0)
    z = (hidden @ weight.t()).requires_grad_()
    loss = ce.masked_cross_entropy(z, labels)
    loss.backward()
    assert loss.item() == 0.0 and z.grad.abs().max().item() == 0.0


def test_strided_inputs_vs_plain_torch():
    # Logits rows taken every other row (a strided view) must be read right.
    hidden, weight, _, _ = lm_head_inputs((18,), 16, 300, torch.float32, bias=False)
    tokens = torch.randint(0, 300, (18,)).to(DEVICE)
    hidden, tokens = hidden[::2], tokens[::2]
    logits = hidden @ weight.t()
    expected = F.cross_entropy(logits, tokens, reduction="none")
    torch.testing.assert_close(ce.masked_cross_entropy(logits[:, ::1], tokens, reduction="none"), expected)


@pytest.mark.skipif(DEVICE == "cuda", reason="the pure-torch fallback is the CPU path without the interpreter")
def test_torch_fallback_without_interpreter(monkeypatch):
    monkeypatch.setattr(_utils, "INTERPRET", False)
    hidden, weight, _, labels = lm_head_inputs((30,), 16, 513, torch.float32, scale=3.0)
    z = (hidden @ weight.t()).requires_grad_()
    ce.masked_cross_entropy(z, labels).backward()
    z64 = z.detach().double().requires_grad_()
    ce.masked_cross_entropy_reference(z64, labels).backward()
    assert_close(z.grad, z64.grad, torch.float32, "dlogits")


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU every test compiles the kernels for real")
def test_kernels_compile_for_h100():
    p, f, i, c = "*bf16", "fp32", "i32", "constexpr"
    signature = {
        "logits_ptr": p, "grad_ptr": p, "labels_ptr": "*i64", "loss_ptr": "*fp32", "scale_ptr": "*fp32",
        "stride_l": i, "stride_g": i, "V": i, "ignore_index": i, "eps": f, "z_loss": f, "softcap": f,
        "HAS_SOFTCAP": c, "COMPUTE_GRAD": c, "BLOCK_V": c,
    }  # fmt: skip
    assert_row_kernels_compile_for_h100(
        "distributed_pt_kernels.cross_entropy", [("_ce_kernel", signature, {"COMPUTE_GRAD": True})]
    )
