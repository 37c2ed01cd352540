"""Tests of kernels/cross_entropy.py against float64 torch references (interpreted on CPU, compiled on a GPU)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first @triton.jit decoration

from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels import cross_entropy as ce  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100


@dataclass(frozen=True)
class Tol:
    rtol: float
    atol: float  # relative to the largest |value| of the reference


# bf16/fp16: the chunk's logits and dlogits are stored in the input dtype (as in torch's own bf16 path).
TOL = {
    torch.float32: Tol(rtol=1e-5, atol=1e-5),
    torch.bfloat16: Tol(rtol=2e-2, atol=2e-2),
    torch.float16: Tol(rtol=3e-3, atol=3e-3),
}
DTYPES = list(TOL)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    tol = TOL[dtype]
    atol = tol.atol * max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual.double(), expected, rtol=tol.rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _inputs(lead, h, v, dtype, bias=True, ignore_frac=0.25, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*lead, h, generator=g) * scale).to(DEVICE, dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(DEVICE, dtype)
    b = (torch.randn(v, generator=g) * 0.1).to(DEVICE, dtype) if bias else None
    labels = torch.randint(0, v, lead, generator=g)
    labels[torch.rand(lead, generator=g) < ignore_frac] = IGNORE
    return hidden, weight, b, labels.to(DEVICE)


def _leaves(*ts, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in ts]


def _check_ce(hidden, weight, bias, labels, dtype, frozen=False, **kw):
    """Loss and every gradient of fused_linear_cross_entropy vs the float64 reference, random upstream gradient."""
    h, w, b = _leaves(hidden, weight, bias)
    h64, w64, b64 = _leaves(hidden, weight, bias, dtype=torch.float64)
    if frozen:
        w.requires_grad_(False)
        w64.requires_grad_(False)
    out = ce.fused_linear_cross_entropy(h, w, labels, b, **kw)
    ref_kw = {k: v for k, v in kw.items() if k != "chunk_size"}
    ref = ce.fused_linear_cross_entropy_reference(h64, w64, labels, b64, **ref_kw)
    assert out.dtype == torch.float32 and out.shape == ref.shape and torch.isfinite(out).all()
    _assert_close(out, ref, dtype, "loss")
    g = torch.rand(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE) + 0.5
    out.backward(g)
    ref.backward(g.double())
    params = [("hidden", h, h64), ("bias", b, b64)] + ([] if frozen else [("weight", w, w64)])
    for name, ours, theirs in params:
        if ours is not None:
            assert ours.grad.dtype == ours.dtype
            _assert_close(ours.grad, theirs.grad, dtype, f"d{name}")
    if frozen:
        assert w.grad is None
    return out


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_ce_matches_reference(dtype, reduction):
    # 74 tokens in chunks of 16 (balanced to 15): several chunks, gathered rows, vocab not a block multiple.
    hidden, weight, bias, labels = _inputs((2, 37), 48, 1001, dtype)
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
    hidden, weight, bias, labels = _inputs((50,), 32, 1001, torch.float32, scale=3.0)
    _check_ce(hidden, weight, bias, labels, torch.float32, reduction=reduction, chunk_size=16, **opts)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_frozen_weight(dtype, reduction):
    hidden, weight, _, labels = _inputs((3, 11), 32, 1001, dtype, bias=False)
    _check_ce(hidden, weight, None, labels, dtype, frozen=True, reduction=reduction, chunk_size=8)


def test_frozen_weight_runs_no_dw_gemm(monkeypatch):
    hidden, weight, _, labels = _inputs((20,), 32, 257, torch.float32, bias=False)
    seen = []
    real = ce._linear_chunks
    monkeypatch.setattr(ce, "_linear_chunks", lambda *a: seen.append(a[4]) or real(*a))
    ce.fused_linear_cross_entropy(hidden.requires_grad_(), weight, labels).backward()
    with torch.no_grad():  # evaluation: the loss only, no gradient work in the forward
        ce.fused_linear_cross_entropy(hidden, weight.requires_grad_(), labels)
    assert seen == [(True, False, False), (False, False, False)]


def test_vocab_50257():
    hidden, weight, bias, labels = _inputs((7,), 32, 50257, torch.float32)
    _check_ce(hidden, weight, bias, labels, torch.float32)


def test_all_ignored_gives_zero_loss_and_grads():
    hidden, weight, bias, labels = _inputs((2, 5), 16, 1001, torch.float32, ignore_frac=1.0)
    h, w, b = _leaves(hidden, weight, bias)
    loss = ce.fused_linear_cross_entropy(h, w, labels, b)
    loss.backward()
    assert loss.item() == 0.0
    assert all(t.grad.abs().max().item() == 0.0 for t in (h, w, b))
    z = (hidden @ weight.t()).requires_grad_()
    loss = ce.masked_cross_entropy(z, labels)
    loss.backward()
    assert loss.item() == 0.0 and z.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_logits_stay_finite(dtype):
    # Logits of order 1e3: exp would overflow without the running max.
    hidden, weight, bias, labels = _inputs((24,), 32, 1001, dtype, scale=1e3 * 32**0.5 / 4)
    out = _check_ce(hidden, weight, bias, labels, dtype, z_loss=1e-4, chunk_size=8)
    assert out.item() > 100.0


def test_multi_block_rows(monkeypatch):
    # Force several vocab blocks per row so the online max / logsumexp carries across blocks in every kernel.
    monkeypatch.setattr(ce, "_INTERPRET_BLOCK_V", 256)
    monkeypatch.setattr(ce, "_GPU_BLOCK_V", 256)
    hidden, weight, bias, labels = _inputs((20,), 16, 1001, torch.float32, scale=4.0)
    _check_ce(hidden, weight, bias, labels, torch.float32, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, chunk_size=8)
    _check_logprobs(torch.float32, softcap=5.0, temperature=0.7, entropy=True, lead=(20,), v=1001)


def _check_logprobs(dtype, softcap, temperature, entropy, lead=(3, 13), v=1001, use=("logp", "entropy")):
    hidden, weight, bias, _ = _inputs(lead, 32, v, dtype, scale=2.0)
    tokens = torch.randint(0, v, lead, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    h, w, b = _leaves(hidden, weight, bias)
    h64, w64, b64 = _leaves(hidden, weight, bias, dtype=torch.float64)
    kw = dict(softcap=softcap, temperature=temperature, return_entropy=entropy)
    out = ce.fused_linear_logprobs(h, w, tokens, b, chunk_size=8, **kw)
    ref = ce.fused_linear_logprobs_reference(h64, w64, tokens, b64, **kw)
    out, ref = (out, ref) if entropy else ((out,), (ref,))
    gen = torch.Generator().manual_seed(4)
    total, total_ref = 0.0, 0.0
    for name, o, r in zip(("logp", "entropy"), out, ref, strict=False):
        assert o.dtype == torch.float32 and o.shape == lead
        _assert_close(o, r, dtype, name)
        if name in use:
            g = torch.randn(lead, generator=gen).to(DEVICE)
            total, total_ref = total + (o * g).sum(), total_ref + (r * g.double()).sum()
    total.backward()
    total_ref.backward()
    for name, ours, theirs in (("hidden", h, h64), ("weight", w, w64), ("bias", b, b64)):
        _assert_close(ours.grad, theirs.grad, dtype, f"d{name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logprobs_match_log_softmax_gather(dtype):
    _check_logprobs(dtype, softcap=None, temperature=1.0, entropy=False)


@pytest.mark.parametrize("use", [("logp", "entropy"), ("entropy",)], ids=["both", "entropy_only"])
@pytest.mark.parametrize("softcap,temperature", [(None, 0.6), (4.0, 1.3)])
def test_logprobs_entropy(softcap, temperature, use):
    _check_logprobs(torch.float32, softcap=softcap, temperature=temperature, entropy=True, use=use)


def test_strided_inputs_vs_plain_torch():
    # RL callers pass views such as input_ids[:, 1:] or every other row: 1-D strided tokens must be read right.
    hidden, weight, _, _ = _inputs((18,), 16, 300, torch.float32, bias=False)
    tokens = torch.randint(0, 300, (18,)).to(DEVICE)
    hidden, tokens = hidden[::2], tokens[::2]
    logits = hidden @ weight.t()
    expected = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(ce.fused_linear_logprobs(hidden, weight, tokens), expected)
    expected = F.cross_entropy(logits, tokens, reduction="none")
    torch.testing.assert_close(ce.fused_linear_cross_entropy(hidden, weight, tokens, reduction="none"), expected)
    torch.testing.assert_close(ce.masked_cross_entropy(logits[:, ::1], tokens, reduction="none"), expected)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_cross_entropy(dtype, reduction):
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(3, 17, 1001, generator=g) * 4).to(DEVICE, dtype)
    labels = torch.randint(0, 1001, (3, 17), generator=g)
    labels[:, ::4] = IGNORE
    labels = labels.to(DEVICE)
    (z,), (z64,) = _leaves(logits), _leaves(logits, dtype=torch.float64)
    out = ce.masked_cross_entropy(z, labels, reduction=reduction)
    ref = F.cross_entropy(z64.reshape(-1, 1001), labels.reshape(-1), ignore_index=IGNORE, reduction=reduction)
    ref = ref.view(labels.shape) if reduction == "none" else ref
    _assert_close(out, ref, dtype, "loss")
    upstream = torch.rand(out.shape, generator=g).to(DEVICE)
    out.backward(upstream)
    ref.backward(upstream.double())
    assert z.grad.dtype == dtype
    _assert_close(z.grad, z64.grad, dtype, "dlogits")


@pytest.mark.skipif(DEVICE == "cuda", reason="the pure-torch fallback is the CPU path without the interpreter")
def test_torch_fallback_without_interpreter(monkeypatch):
    monkeypatch.setattr(ce, "_INTERPRET", False)
    hidden, weight, bias, labels = _inputs((30,), 16, 513, torch.float32, scale=3.0)
    _check_ce(hidden, weight, bias, labels, torch.float32, label_smoothing=0.1, z_loss=1e-3, softcap=4.0, chunk_size=8)
    _check_ce(hidden, weight, bias, labels, torch.float32, reduction="none", chunk_size=8)
    _check_logprobs(torch.float32, softcap=4.0, temperature=0.8, entropy=True)
    z = (hidden @ weight.t()).requires_grad_()
    ce.masked_cross_entropy(z, labels).backward()
    z64 = z.detach().double().requires_grad_()
    ce.masked_cross_entropy_reference(z64, labels).backward()
    _assert_close(z.grad, z64.grad, torch.float32, "dlogits")


def test_second_backward_is_refused():
    hidden, weight, _, labels = _inputs((8,), 16, 64, torch.float32, bias=False)
    h = hidden.requires_grad_()
    loss = ce.fused_linear_cross_entropy(h, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("frozen", [False, True])
def test_gpu_bf16_large(frozen):
    hidden, weight, _, labels = _inputs((4, 1024), 1024, 32000, torch.bfloat16, bias=False)
    _check_ce(hidden, weight, None, labels, torch.bfloat16, frozen=frozen)
    _check_ce(hidden, weight, None, labels, torch.bfloat16, frozen=frozen, reduction="none", chunk_size=1024)


_COMPILE_SCRIPT = """
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import cross_entropy as ce
p, f, i, c = "*bf16", "fp32", "i32", "constexpr"
common = {"stride_l": i, "V": i, "softcap": f, "inv_temp": f, "HAS_SOFTCAP": c, "BLOCK_V": c}
kernels = [
    (ce._ce_kernel, {"logits_ptr": p, "grad_ptr": p, "labels_ptr": "*i64", "loss_ptr": "*fp32", "scale_ptr": "*fp32",
     "stride_l": i, "stride_g": i, "V": i, "ignore_index": i, "eps": f, "z_loss": f, "softcap": f, "HAS_SOFTCAP": c,
     "COMPUTE_GRAD": c, "BLOCK_V": c}, {"COMPUTE_GRAD": True}),
    (ce._logprob_fwd_kernel, {"logits_ptr": p, "tokens_ptr": "*i64", "logp_ptr": "*fp32", "ent_ptr": "*fp32",
     "lse_ptr": "*fp32", **common, "RETURN_ENT": c}, {"RETURN_ENT": True}),
    (ce._logprob_bwd_kernel, {"logits_ptr": p, "tokens_ptr": "*i64", "lse_ptr": "*fp32", "ent_ptr": "*fp32",
     "glp_ptr": "*fp32", "gent_ptr": "*fp32", **common, "HAS_LP_GRAD": c, "HAS_ENT_GRAD": c},
     {"HAS_LP_GRAD": True, "HAS_ENT_GRAD": True}),
]
for fn, sig, flags in kernels:
    consts = {"HAS_SOFTCAP": True, "BLOCK_V": ce._GPU_BLOCK_V, **flags}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": ce._GPU_NUM_WARPS})
    assert k.asm["cubin"], fn
print("compiled")
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU every test compiles the kernels for real")
def test_kernels_compile_for_h100():
    # The interpreter accepts code that does not compile (e.g. tl.dot under 16): build sm_90 cubins without a GPU.
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], cwd=root, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
