"""Seeding and the per-step training metrics: loss, lr, grad norm, tokens/s, MFU (GPU), peak memory."""

from __future__ import annotations

import random
import resource
import time

import numpy as np
import torch

from distributed_pt.engine import dist

# Dense bf16 peak FLOP/s per GPU, for the MFU estimate (vendor figures, no sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def peak_memory_gib() -> float:
    """Peak GPU memory allocated by torch, or this process's peak RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def num_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    """Parameters (all, or those that train), counting ZeRO-3 partitioned ones at their full size."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters() if p.requires_grad or not trainable_only)


def optimizer_state_mib(optimizer) -> float:
    """MiB of optimizer state (Adam moments) held on this rank, read from the innermost torch optimizer."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    tensors = (t for st in getattr(optimizer, "state", {}).values() for t in st.values() if torch.is_tensor(t))
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


class StepTimer:
    """Accumulates per-micro-batch values (loss, ...) and token counts between log points; `flush` averages them
    over micro batches and ranks and adds lr, grad norm, tokens/s, peak memory, optimizer state and MFU."""

    def __init__(self, engine):
        self.engine = engine
        self.n_params = num_parameters(engine.module)
        self.n_trainable = num_parameters(engine.module, trainable_only=True)
        self.peak = peak_flops()
        self._reset()

    def _reset(self) -> None:
        self.names: list[str] = []
        self.sums = torch.zeros(2)  # micro batches, tokens, then one sum per value name
        self.start = time.perf_counter()

    def add(self, tokens: int, **values: torch.Tensor | float) -> None:
        if not self.names:
            self.names = list(values)
            self.sums = torch.zeros(2 + len(values))
        row = [1.0, float(tokens), *(float(torch.as_tensor(v).detach()) for v in values.values())]
        self.sums += torch.tensor(row)

    def flush(self) -> dict[str, float]:
        n, tokens, *sums = dist.all_reduce_sum(self.sums).tolist()
        elapsed = time.perf_counter() - self.start
        grad_norm = self.engine.get_global_grad_norm()
        metrics = {name: value / max(n, 1) for name, value in zip(self.names, sums, strict=True)}
        metrics |= {
            "lr": self.engine.get_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_s": tokens / elapsed,
            "peak_mem_gib": peak_memory_gib(),
            "optim_state_mib": optimizer_state_mib(self.engine.optimizer),
        }
        if self.peak:
            # Per token: 2N forward + 2N for activation gradients + 2 per trainable parameter for weight gradients
            # (6N for full fine-tuning; less with LoRA's frozen base), over the whole job's peak. Attention excluded.
            flops_per_token = 4 * self.n_params + 2 * self.n_trainable
            metrics["mfu"] = flops_per_token * metrics["tokens_per_s"] / (self.peak * dist.world_size())
        self._reset()
        return metrics
