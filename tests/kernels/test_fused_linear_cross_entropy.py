"""Tests of kernels/fused_linear_cross_entropy.py against float64 torch references (interpreted on CPU, compiled on a
GPU)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first @triton.jit decoration

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from distributed_pt_kernels import _utils  # noqa: E402
from distributed_pt_kernels import fused_linear_cross_entropy as flce  # noqa: E402
from tests.kernels.helpers import DEVICE, DTYPES, assert_close, leaves, lm_head_inputs  # noqa: E402


def _check_ce(hidden, weight, bias, labels, dtype, frozen=False, **kw):
    """Loss and every gradient of fused_linear_cross_entropy vs the float64 reference, random upstream gradient."""
    h, w, b = leaves(hidden, weight, bias)
    h64, w64, b64 = leaves(hidden, weight, bias, dtype=torch.float64)
    if frozen:
        w.requires_grad_(False)
        w64.requires_grad_(False)
    out = flce.fused_linear_cross_entropy(h, w, labels, b, **kw)
    ref_kw = {k: v for k, v in kw.items() if k != "chunk_size"}
    ref = flce.fused_linear_cross_entropy_reference(h64, w64, labels, b64, **ref_kw)
    assert out.dtype == torch.float32 and out.shape == ref.shape and torch.isfinite(out).all()
    assert_close(out, ref, dtype, "loss")
    g = torch.rand(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE) + 0.5
    out.backward(g)
    ref.backward(g.double())
    params = [("hidden", h, h64), ("bias", b, b64)] + ([] if frozen else [("weight", w, w64)])
    for name, ours, theirs in params:
        if ours is not None:
            assert ours.grad.dtype == ours.dtype
            assert_close(ours.grad, theirs.grad, dtype, f"d{name}")
    if frozen:
        assert w.grad is None
    return out


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_ce_matches_reference(dtype, reduction):
    # 74 tokens in chunks of 16 (balanced to 15): several chunks, gathered rows, vocab not a block multiple.
    hidden, weight, bias, labels = lm_head_inputs((2, 37), 48, 1001, dtype)
    _check_ce(hidden, weight, bias, labels, dtype, reduction=reduction, chunk_size=16)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize(
    "opts",
    [
        {"label_smoothing": 0.1},
        {"z_loss": 1e-2},
        {"softcap": 2.0},
        {"label_smoothing": 0.2, "z_loss": 1e-3, "softcap": 3.0},
    ],
    ids=["smoothing", "z_loss", "softcap", "all"],
)
def test_fused_ce_options(opts, reduction):
    hidden, weight, bias, labels = lm_head_inputs((50,), 32, 1001, torch.float32, scale=3.0)
    _check_ce(hidden, weight, bias, labels, torch.float32, reduction=reduction, chunk_size=16, **opts)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_frozen_weight(dtype, reduction):
    hidden, weight, _, labels = lm_head_inputs((3, 11), 32, 1001, dtype, bias=False)
    _check_ce(hidden, weight, None, labels, dtype, frozen=True, reduction=reduction, chunk_size=8)


def test_frozen_weight_runs_no_dw_gemm(monkeypatch):
    hidden, weight, _, labels = lm_head_inputs((20,), 32, 257, torch.float32, bias=False)
    seen = []
    real = flce.linear_chunks
    monkeypatch.setattr(flce, "linear_chunks", lambda *a: seen.append(a[4]) or real(*a))
    flce.fused_linear_cross_entropy(hidden.requires_grad_(), weight, labels).backward()
    with torch.no_grad():  # evaluation: the loss only, no gradient work in the forward
        flce.fused_linear_cross_entropy(hidden, weight.requires_grad_(), labels)
    assert seen == [(True, False, False), (False, False, False)]


def test_vocab_50257():
    hidden, weight, bias, labels = lm_head_inputs((7,), 32, 50257, torch.float32)
    _check_ce(hidden, weight, bias, labels, torch.float32)


def test_all_ignored_gives_zero_loss_and_grads():
    hidden, weight, bias, labels = lm_head_inputs((2, 5), 16, 1001, torch.float32, ignore_frac=1.0)
    h, w, b = leaves(hidden, weight, bias)
    loss = flce.fused_linear_cross_entropy(h, w, labels, b)
    loss.backward()
    assert loss.item() == 0.0
    assert all(t.grad.abs().max().item() == 0.0 for t in (h, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_logits_stay_finite(dtype):
    # Logits of order 1e3: exp would overflow without the running max.
    hidden, weight, bias, labels = lm_head_inputs((24,), 32, 1001, dtype, scale=1e3 * 32**0.5 / 4)
    out = _check_ce(hidden, weight, bias, labels, dtype, z_loss=1e-4, chunk_size=8)
    assert out.item() > 100.0


def test_multi_block_rows(monkeypatch):
    # Force several vocab blocks per row so the online max / logsumexp carries across blocks in the CE row kernel.
    monkeypatch.setattr(_utils, "INTERPRET_BLOCK_V", 256)
    monkeypatch.setattr(_utils, "GPU_BLOCK_V", 256)
    hidden, weight, bias, labels = lm_head_inputs((20,), 16, 1001, torch.float32, scale=4.0)
    _check_ce(hidden, weight, bias, labels, torch.float32, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, chunk_size=8)


def test_strided_inputs_vs_plain_torch():
    # Callers pass views such as every other row: strided hidden states and 1-D strided labels must be read right.
    hidden, weight, _, _ = lm_head_inputs((18,), 16, 300, torch.float32, bias=False)
    tokens = torch.randint(0, 300, (18,)).to(DEVICE)
    hidden, tokens = hidden[::2], tokens[::2]
    expected = F.cross_entropy(hidden @ weight.t(), tokens, reduction="none")
    torch.testing.assert_close(flce.fused_linear_cross_entropy(hidden, weight, tokens, reduction="none"), expected)


@pytest.mark.skipif(DEVICE == "cuda", reason="the pure-torch fallback is the CPU path without the interpreter")
def test_torch_fallback_without_interpreter(monkeypatch):
    monkeypatch.setattr(_utils, "INTERPRET", False)
    hidden, weight, bias, labels = lm_head_inputs((30,), 16, 513, torch.float32, scale=3.0)
    _check_ce(hidden, weight, bias, labels, torch.float32, label_smoothing=0.1, z_loss=1e-3, softcap=4.0, chunk_size=8)
    _check_ce(hidden, weight, bias, labels, torch.float32, reduction="none", chunk_size=8)


def test_second_backward_is_refused():
    hidden, weight, _, labels = lm_head_inputs((8,), 16, 64, torch.float32, bias=False)
    h = hidden.requires_grad_()
    loss = flce.fused_linear_cross_entropy(h, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("frozen", [False, True])
def test_gpu_bf16_large(frozen):
    hidden, weight, _, labels = lm_head_inputs((4, 1024), 1024, 32000, torch.bfloat16, bias=False)
    _check_ce(hidden, weight, None, labels, torch.bfloat16, frozen=frozen)
    _check_ce(hidden, weight, None, labels, torch.bfloat16, frozen=frozen, reduction="none", chunk_size=1024)
