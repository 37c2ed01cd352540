"""Benchmark of distributed_pt_kernels.fused_linear_cross_entropy (LM head + masked CE, forward + backward, bf16).

Providers (hidden always needs a gradient, as inside a network; a quarter of the labels are ignore_index, scattered):

* ``floor_valid``: the GEMMs alone with torch.mm on the non-ignored tokens only: logits = X Wᵀ, dX = G W, and
  dW = Gᵀ X when the head is trainable. This is what our design must approach (it skips ignored rows).
* ``floor_all``: the same GEMMs on all tokens: the floor of any method that does not skip ignored tokens.
* ``ours``: ``fused_linear_cross_entropy`` with its default chunk rule; ``ours_c256``: ``chunk_size=256`` (the
  low-memory setting, about Liger's logits footprint), to show the time/memory trade-off of the chunk rule.
* ``torch``: ``F.cross_entropy(F.linear(x, w).float(), labels)`` (HF-style upcast of the full logits).
* ``liger``: Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` (skipped, with a note, when not installed; GPU only).

Cases: tokens ∈ {4096, 8192, 16384}, hidden 4096, vocab ∈ {32000, 128256, 151936}, head trainable or frozen.
Metrics: median time (ms), peak extra memory (MiB, gradients included), and time ratios ``vs_<provider>`` to both
floors and to each peer. Targets on one H100 at 8192 tokens, vocab 128256: trainable ≤ 38 ms (torch 52 ms,
13.7 GiB; Liger 65 ms, 1.1 GiB), frozen ≤ 26 ms (torch 40 ms).

Usage::

    python -m benchmarks.bench_cross_entropy              # full sweep on a GPU → benchmarks/results/
    python -m benchmarks.bench_cross_entropy --quick      # 8192 tokens, vocab 128256, both heads
    python -m benchmarks.bench_cross_entropy --cpu-smoke --out /tmp/bench   # tiny shape in the Triton interpreter
"""

from __future__ import annotations

import argparse
import itertools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.harness import cuda_device, make_record, measure, save_results

BENCH = "bench_cross_entropy"
TOKENS = [4096, 8192, 16384]
VOCABS = [32000, 128256, 151936]
HIDDEN = 4096
HEADS = ["trainable", "frozen"]
IGNORE_FRAC = 0.25
DTYPE = torch.bfloat16
PEERS = ("torch", "liger")


def _liger_loss() -> Callable | None:
    """Liger's fused linear CE module, or None (with a note) when it cannot run here."""
    if not torch.cuda.is_available():
        print("note: liger skipped: Liger-Kernel runs on CUDA only")
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        print("note: liger skipped: liger-kernel is not installed (pip install liger-kernel)")
        return None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=-100)


def _inputs(case: dict, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, h, v = case["tokens"], case["hidden"], case["vocab"]
    x = torch.randn(n, h, device=device, dtype=DTYPE).requires_grad_()
    w = (torch.randn(v, h, device=device, dtype=DTYPE) * h**-0.5).requires_grad_(case["head"] == "trainable")
    labels = torch.randint(0, v, (n,), device=device)
    labels[torch.rand(n, device=device) < IGNORE_FRAC] = -100
    return x, w, labels


def _floors(x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> dict[str, Callable[[], None]]:
    """The GEMM-only floors on preallocated buffers (the logits buffer doubles as dlogits: real values, not zeros)."""
    x = x.detach()
    x_valid = x[labels != -100].contiguous()
    logits = torch.empty(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)
    dx = torch.empty_like(x)
    dw = torch.empty_like(w) if w.requires_grad else None

    def gemms(rows: torch.Tensor) -> None:
        n = rows.shape[0]
        torch.mm(rows, w.detach().t(), out=logits[:n])
        torch.mm(logits[:n], w.detach(), out=dx[:n])
        if dw is not None:
            torch.mm(logits[:n].t(), rows, out=dw)

    return {"floor_valid": lambda: gemms(x_valid), "floor_all": lambda: gemms(x)}


def _providers(x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, liger) -> dict[str, Callable[[], None]]:  # noqa: ANN001
    from distributed_pt_kernels.fused_linear_cross_entropy import (
        fused_linear_cross_entropy,  # after --cpu-smoke set TRITON_INTERPRET
    )

    fns = {
        "ours": lambda: fused_linear_cross_entropy(x, w, labels).backward(),
        "ours_c256": lambda: fused_linear_cross_entropy(x, w, labels, chunk_size=256).backward(),
        "torch": lambda: F.cross_entropy(F.linear(x, w).float(), labels, ignore_index=-100).backward(),
    }
    if liger is not None:

        def liger_fn() -> None:
            out = liger(w, x, labels)
            (out[0] if isinstance(out, tuple) else out).backward()

        fns["liger"] = liger_fn
    return fns


def run(cases: list[dict], device: str, warmup: int, rep: int) -> list[dict]:
    """Measure the floors and every provider on every case; returns flat records (time, memory, ratios)."""
    liger = _liger_loss()
    records: list[dict] = []
    for case in cases:
        x, w, labels = _inputs(case, device)
        grads = [x, w] if w.requires_grad else [x]
        results = {name: measure(fn, warmup=warmup, rep=rep) for name, fn in _floors(x, w, labels).items()}
        if device.startswith("cuda"):
            torch.cuda.empty_cache()  # the floors' buffers are gone: do not let them pad the next peaks
        for name, fn in _providers(x, w, labels, liger).items():
            results[name] = measure(fn, warmup=warmup, rep=rep, grad_to_none=grads)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        for name, (ms, mib) in results.items():
            records.append(make_record(BENCH, case, name, "time", ms, "ms"))
            records.append(make_record(BENCH, case, name, "memory", mib, "MiB"))
            for other in ("floor_valid", "floor_all", "ours", *PEERS):
                if other != name and other in results and not name.startswith("floor"):
                    records.append(make_record(BENCH, case, name, f"vs_{other}", ms / results[other][0], "x"))
        line = "  ".join(f"{p} {ms:.2f} ms/{mib:.0f} MiB" for p, (ms, mib) in results.items())
        print(f"{case}: {line}", flush=True)
        del x, w, labels
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8192 tokens, vocab 128256, trainable and frozen head")
    parser.add_argument("--device", default="cuda", help="CUDA device (default: cuda)")
    parser.add_argument("--out", default="benchmarks/results", help="results folder")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shape in the Triton interpreter, CPU only")
    parser.add_argument("--wandb-project", default=None, help="also log the records as a W&B table")
    args = parser.parse_args(argv)

    warmup, rep = 25, 100
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before distributed_pt_kernels.fused_linear_cross_entropy is imported
        device, warmup, rep = "cpu", 1, 1
        cases = [dict(tokens=64, hidden=32, vocab=1000, head=head) for head in HEADS]
    else:
        device = cuda_device(BENCH, args.device)
        grid = itertools.product([8192], [128256], HEADS) if args.quick else itertools.product(TOKENS, VOCABS, HEADS)
        cases = [dict(tokens=t, hidden=HIDDEN, vocab=v, head=head) for t, v, head in grid]

    records = run(cases, device, warmup, rep)
    path = save_results(BENCH, records, args.out, wandb_project=args.wandb_project)
    print(path.with_suffix(".md").read_text())
    print(f"wrote {path}, {path.with_suffix('.md')}, {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
