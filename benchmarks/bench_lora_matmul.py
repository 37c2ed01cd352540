"""Benchmark of distributed_pt_kernels.lora_matmul.lora_linear (forward + backward, bf16) against its floor and peers.

Providers, all computing dx (the layer's input needs a gradient, as inside a network):

* ``floor``: the frozen base GEMMs alone, forward ``x Wᵀ`` and backward ``dx = dy W`` (cuBLAS); no LoRA.
* ``ours``: ``lora_linear`` as layers call it (``path="auto"``: the path
  `distributed_pt_kernels.lora_matmul.choose_path` picks for the shape).
* ``ours_fused``: the Triton GEMMs with the rank-r update fused into their epilogues, on every shape.
* ``ours_cublas``: cuBLAS GEMMs with the rank-r update accumulated in place (``addmm_``), on every shape.
* ``torch``: naive LoRA in torch, ``x Wᵀ + s·(x Aᵀ) Bᵀ``.
* ``peft``: PEFT's ``lora.Linear`` (``get_peft_model`` on a one-layer module, dropout 0).
* ``full``: a fully trained linear (W requires grad, so backward also computes dW).

Shapes are Llama-3-8B projections (4096→4096, 4096→14336, 14336→4096, 4096→1024) and Llama-3.2-1B's key/value one
(2048→256) at 8192 and 16384 tokens with
r ∈ {8, 16, 64}. Metrics per case and provider: median time (ms), peak extra memory (MiB), and the time ratio to the
floor and to PEFT. Target on one H100 at 8192 tokens, 4096→4096, r=16: floor 0.80 ms, torch 1.20 ms, PEFT 2.04 ms,
ours within 1.10× of the floor.

Usage::

    python -m benchmarks.bench_lora_matmul              # full sweep on a GPU → benchmarks/results/
    python -m benchmarks.bench_lora_matmul --quick      # one shape
    python -m benchmarks.bench_lora_matmul --cpu-smoke --out /tmp/bench   # tiny shapes in the Triton interpreter
"""

from __future__ import annotations

import argparse
import itertools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.harness import cuda_device, make_record, measure, save_results

BENCH = "bench_lora_matmul"
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024), (2048, 256)]  # (k, n)
TOKENS = [8192, 16384]
RANKS = [8, 16, 64]
DTYPE = torch.bfloat16


def _peft_layer(k: int, n: int, r: int, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    class OneLayer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(k, n, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["proj"], init_lora_weights=False)
    return get_peft_model(OneLayer(), cfg).to(device=device, dtype=dtype)


def _providers(
    tokens: int, k: int, n: int, r: int, device: str, dtype: torch.dtype
) -> dict[str, tuple[Callable[[], None], list[torch.Tensor]]]:
    """provider → (one forward+backward, tensors whose grads are reset between calls)."""
    from distributed_pt_kernels.lora_matmul import lora_linear  # after --cpu-smoke has set TRITON_INTERPRET

    x = torch.randn(tokens, k, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, n, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype) * k**-0.5
    a = (torch.randn(r, k, device=device, dtype=dtype) * k**-0.5).requires_grad_()
    b = (torch.randn(n, r, device=device, dtype=dtype) * r**-0.5).requires_grad_()
    w_full = w.clone().requires_grad_()
    scale = 2.0
    peft = _peft_layer(k, n, r, device, dtype)
    peft_params = [p for p in peft.parameters() if p.requires_grad]

    def floor() -> None:
        F.linear(x, w).backward(dy)

    def ours(path: str = "auto") -> Callable[[], None]:
        return lambda: lora_linear(x, w, a, b, scale, path=path).backward(dy)

    def naive() -> None:
        (F.linear(x, w) + F.linear(F.linear(x, a), b) * scale).backward(dy)

    def peft_fn() -> None:
        peft(x).backward(dy)

    def full() -> None:
        F.linear(x, w_full).backward(dy)

    return {
        "floor": (floor, [x]),
        "ours": (ours(), [x, a, b]),
        "ours_fused": (ours("fused"), [x, a, b]),
        "ours_cublas": (ours("cublas"), [x, a, b]),
        "torch": (naive, [x, a, b]),
        "peft": (peft_fn, [x, *peft_params]),
        "full": (full, [x, w_full]),
    }


def run(cases: list[dict], device: str, warmup: int, rep: int) -> list[dict]:
    """Measure every provider on every case; returns flat records (time, memory, ratios)."""
    records: list[dict] = []
    cached: dict[tuple, dict[str, tuple[float, float]]] = {}  # floor and full do not depend on r
    for case in cases:
        base_key = (case["tokens"], case["k"], case["n"])
        fns = _providers(case["tokens"], case["k"], case["n"], case["r"], device, DTYPE)
        results = dict(cached.get(base_key, {}))
        for name, (fn, grads) in fns.items():
            if name not in results:
                results[name] = measure(fn, warmup=warmup, rep=rep, grad_to_none=grads)
        cached[base_key] = {p: results[p] for p in ("floor", "full")}
        del fns
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        for name, (ms, mib) in results.items():
            records.append(make_record(BENCH, case, name, "time", ms, "ms"))
            records.append(make_record(BENCH, case, name, "memory", mib, "MiB"))
            if name != "floor":
                records.append(make_record(BENCH, case, name, "vs_floor", ms / results["floor"][0], "x"))
            if name != "peft":
                records.append(make_record(BENCH, case, name, "vs_peft", ms / results["peft"][0], "x"))
        line = "  ".join(f"{p} {ms:.3f} ms" for p, (ms, _) in results.items())
        print(f"{case}: {line}", flush=True)
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape: 8192 tokens, 4096→4096, r=16")
    parser.add_argument("--device", default="cuda", help="CUDA device (default: cuda)")
    parser.add_argument("--out", default="benchmarks/results", help="results folder")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes in the Triton interpreter, CPU only")
    parser.add_argument("--wandb-project", default=None, help="also log the records as a W&B table")
    args = parser.parse_args(argv)

    warmup, rep = 25, 100
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before distributed_pt_kernels.lora_matmul is imported
        device, warmup, rep = "cpu", 1, 1
        cases = [dict(tokens=64, k=k, n=n, r=8) for k, n in [(64, 48), (96, 64)]]
    else:
        device = cuda_device(BENCH, args.device)
        if args.quick:
            cases = [dict(tokens=8192, k=4096, n=4096, r=16)]
        else:
            cases = [dict(tokens=t, k=k, n=n, r=r) for t, (k, n), r in itertools.product(TOKENS, SHAPES, RANKS)]

    records = run(cases, device, warmup, rep)
    path = save_results(BENCH, records, args.out, wandb_project=args.wandb_project)
    print(path.with_suffix(".md").read_text())
    print(f"wrote {path}, {path.with_suffix('.md')}, {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
