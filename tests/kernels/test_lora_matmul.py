"""Tests of kernels/lora_matmul.py against a float64 torch reference (interpreted on CPU, compiled on a GPU)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first @triton.jit decoration

import pytest  # noqa: E402

from distributed_pt_kernels.lora_matmul import dropout_keep_mask, lora_linear, lora_linear_reference  # noqa: E402
from tests.kernels.helpers import DEVICE, DTYPES, assert_close  # noqa: E402

SCALE = 1.75

# (x shape, n, r): odd sizes (k, n not block multiples, r < 16 padded by masking), aligned, and r padded to 64.
SHAPES = [((3, 37, 72), 130, 5), ((64, 64), 64, 16), ((2, 50, 96), 80, 40)]


def _inputs(x_shape, n, r, dtype, bias=True, seed=0):
    """Random inputs scaled so that the output and every gradient are O(1)."""
    g = torch.Generator().manual_seed(seed)
    k = x_shape[-1]

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=DEVICE, dtype=dtype)

    x = rnd(*x_shape).requires_grad_()
    weight = rnd(n, k, std=k**-0.5)
    lora_a = rnd(r, k, std=k**-0.5).requires_grad_()
    lora_b = rnd(n, r, std=r**-0.5).requires_grad_()
    b = rnd(n).requires_grad_() if bias else None
    dy = rnd(*x_shape[:-1], n)
    return x, weight, lora_a, lora_b, b, dy


def _check_against_reference(
    x, weight, lora_a, lora_b, bias, dy, dtype, p=0.0, seed=None, mask=None, path="auto"
):  # fmt: skip
    """Run kernel and float64 reference on the same leaves; compare output and every gradient."""
    leaves = [t for t in (x, lora_a, lora_b, bias) if t is not None]
    y = lora_linear(x, weight, lora_a, lora_b, SCALE, bias, p, True, dropout_seed=seed, path=path)
    assert y.shape == (*x.shape[:-1], weight.shape[0]) and y.dtype == x.dtype
    y.backward(dy)
    grads = [t.grad for t in leaves]

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rx, ra, rb = ref_leaves[:3]
    rbias = ref_leaves[3] if bias is not None else None
    y_ref = lora_linear_reference(
        rx, weight.double(), ra, rb, SCALE, rbias, p, True, dropout_mask=mask, compute_dtype=torch.float64
    )
    y_ref.backward(dy.double())
    assert_close(y, y_ref, dtype, "forward")
    names = ["dx", "dA", "dB", "dbias"][: len(leaves)]
    for name, got, ref in zip(names, grads, [t.grad for t in ref_leaves], strict=True):
        assert got.dtype == dtype and got.shape == ref.shape, name
        assert_close(got, ref, dtype, name)


@pytest.mark.parametrize("path", ["fused", "cublas"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("x_shape,n,r", SHAPES + [((5, 33, 96), 24, 7)], ids=lambda v: str(v))
def test_matches_reference(x_shape, n, r, dtype, bias, path):
    _check_against_reference(*_inputs(x_shape, n, r, dtype, bias), dtype, path=path)


def test_narrow_outputs_take_the_cublas_path(monkeypatch):
    """GQA key/value shapes (n < k / 2), where the fused kernel lost to PEFT on the H100, go through cuBLAS with the
    rank-r term added in place; the rest through the fused kernel."""
    from distributed_pt_kernels import lora_matmul

    assert lora_matmul.choose_path(1024, 4096) == "cublas" and lora_matmul.choose_path(256, 2048) == "cublas"
    assert lora_matmul.choose_path(4096, 4096) == "fused" and lora_matmul.choose_path(14336, 4096) == "fused"
    assert lora_matmul.choose_path(4096, 14336) == "cublas"  # down_proj: 0.29 of its input
    calls = []
    monkeypatch.setattr(lora_matmul, "_lora_matmul", lambda *a, **k: calls.append(1) or a[0] @ a[1])
    x, weight, lora_a, lora_b, bias, dy = _inputs((4, 96), 24, 7, torch.float32)
    lora_linear(x, weight, lora_a, lora_b, SCALE, bias).backward(dy)
    assert calls == []
    with pytest.raises(ValueError, match="path must be"):
        lora_linear(x, weight, lora_a, lora_b, SCALE, bias, path="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_input(dtype):
    # 3D view whose leading dims cannot merge (the launcher copies) and a 2D transpose (the kernel reads strides).
    x3, weight, lora_a, lora_b, bias, dy3 = _inputs((37, 3, 72), 130, 5, dtype)
    x3 = x3.detach().transpose(0, 1).requires_grad_()  # (3, 37, 72), not contiguous
    assert not x3.is_contiguous()
    _check_against_reference(x3, weight, lora_a, lora_b, bias, dy3.transpose(0, 1), dtype)

    x2, weight, lora_a, lora_b, bias, dy2 = _inputs((40, 72), 130, 5, dtype, seed=1)
    x2 = x2.detach().t().contiguous().t().requires_grad_()  # (40, 72) with strides (1, 40)
    assert x2.stride() == (1, 40)
    _check_against_reference(x2, weight, lora_a, lora_b, bias, dy2, dtype)


def test_mixed_parameter_dtypes():
    # fp32 LoRA weights with bf16 activations: products in bf16, LoRA grads back in fp32.
    x, weight, lora_a, lora_b, bias, dy = _inputs((3, 37, 72), 130, 5, torch.bfloat16)
    a32 = lora_a.detach().float().requires_grad_()
    b32 = lora_b.detach().float().requires_grad_()
    y = lora_linear(x, weight, a32, b32, SCALE, None)
    y.backward(dy)
    assert y.dtype == torch.bfloat16 and a32.grad.dtype == b32.grad.dtype == torch.float32
    ra, rb = a32.detach().double().requires_grad_(), b32.detach().double().requires_grad_()
    lora_linear_reference(x.detach().double(), weight.double(), ra, rb, SCALE).backward(dy.double())
    assert_close(a32.grad, ra.grad, torch.bfloat16, "dA")
    assert_close(b32.grad, rb.grad, torch.bfloat16, "dB")


@pytest.mark.parametrize("path", ["fused", "cublas"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dropout_matches_reference_with_same_mask(dtype, path):
    # The mask is drawn for xAᵀ, redrawn for dA and regenerated for dx (fused: in its epilogue): all must agree.
    x, weight, lora_a, lora_b, bias, dy = _inputs((3, 37, 72), 130, 5, dtype)
    p, seed = 0.3, 1234
    mask = dropout_keep_mask((3 * 37, 72), p, seed, DEVICE)
    _check_against_reference(x, weight, lora_a, lora_b, bias, dy, dtype, p=p, seed=seed, mask=mask, path=path)


def test_dropout_off_in_eval_and_at_zero():
    x, weight, lora_a, lora_b, bias, _ = _inputs((3, 37, 72), 130, 5, torch.float32)
    with torch.no_grad():
        plain = lora_linear(x, weight, lora_a, lora_b, SCALE, bias)
        assert torch.equal(lora_linear(x, weight, lora_a, lora_b, SCALE, bias, 0.5, False), plain)
        assert torch.equal(lora_linear(x, weight, lora_a, lora_b, SCALE, bias, 0.0, True), plain)
        torch.manual_seed(7)
        drop1 = lora_linear(x, weight, lora_a, lora_b, SCALE, bias, 0.5, True)
        torch.manual_seed(7)
        drop2 = lora_linear(x, weight, lora_a, lora_b, SCALE, bias, 0.5, True)
    assert torch.equal(drop1, drop2)  # the seed comes from torch's generator
    assert not torch.equal(drop1, plain)


def test_dropout_mask_statistics():
    p, shape = 0.25, (256, 192)
    mask = dropout_keep_mask(shape, p, 3, DEVICE)
    assert torch.equal(mask, dropout_keep_mask(shape, p, 3, DEVICE))
    assert not torch.equal(mask, dropout_keep_mask(shape, p, 4, DEVICE))
    n = mask.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(mask.float().mean().item() - (1 - p)) < 5 * sigma  # E[drop(x)] = x with the 1/(1-p) rescale
    assert abs(mask[:, 0].float().mean().item() - (1 - p)) < 0.15  # no column or row is stuck
    assert abs(mask[0].float().mean().item() - (1 - p)) < 0.15


def test_empty_and_frozen_weight():
    x, weight, lora_a, lora_b, bias, _ = _inputs((0, 72), 130, 5, torch.float32)
    assert lora_linear(x, weight, lora_a, lora_b, SCALE, bias).shape == (0, 130)
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(x, weight.requires_grad_(), lora_a, lora_b, SCALE)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("x_shape,n,r", [((2, 2048, 4096), 4096, 16), ((3, 1000, 4000), 1100, 8)], ids=str)
def test_gpu_bf16_large(x_shape, n, r):
    _check_against_reference(*_inputs(x_shape, n, r, torch.bfloat16), torch.bfloat16)
