"""Seeding and the per-step training metrics: loss, lr, grad norm, tokens/s, MFU (GPU), peak memory."""

from __future__ import annotations

import random
import resource
import time
from typing import Any

import numpy as np
import torch

from distributed_pt import dist
from distributed_pt.models.zero import unwrap

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


def inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The innermost torch optimizer under DeepSpeed's wrappers."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_state_mib(optimizer: Any) -> float:
    """MiB of optimizer state (Adam moments) held on this rank, read from the innermost torch optimizer."""
    state = getattr(inner_optimizer(optimizer), "state", {})
    tensors = (t for st in state.values() for t in st.values() if torch.is_tensor(t))
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def flops_per_token(model: torch.nn.Module, seq_len: float) -> float:
    """Model FLOPs per trained token of one step (forward + backward, no recompute; attention as in PaLM app. B).

    Matmuls: 2N forward + 2N for input gradients + 2N_trainable for weight gradients, N = weights of the linear layers
    (LM head and LoRA adapters included, embedding lookups not; full sizes under ZeRO-3); attention:
    12 · layers · hidden · seq_len.
    """
    from transformers.pytorch_utils import Conv1D

    from distributed_pt.models.lora import LoraLinear

    model = unwrap(model)
    n_mm = n_train = 0
    seen: set[int] = set()
    for m in model.modules():
        if isinstance(m, torch.nn.Linear | LoraLinear | Conv1D):
            for p in (m.weight, getattr(m, "lora_A", None), getattr(m, "lora_B", None)):
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    n_mm += getattr(p, "ds_numel", p.numel())
                    n_train += getattr(p, "ds_numel", p.numel()) if p.requires_grad else 0
    attention = 12.0 * model.config.num_hidden_layers * model.config.hidden_size * seq_len
    return 4.0 * n_mm + 2.0 * n_train + attention


class StepTimer:
    """Accumulates per-micro-batch values (loss, ...) and token counts between log points; `flush` averages them
    over micro batches and ranks and adds lr, grad norm, tokens/s, peak memory, optimizer state and MFU."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.peak = peak_flops()
        self._reset()

    def _reset(self) -> None:
        self.names: list[str] = []
        self.sums = torch.zeros(4)  # micro batches, tokens, sequences, slots, then one sum per value name
        self.start = time.perf_counter()

    def add(self, tokens: int, sequences: int, slots: int, **values: torch.Tensor | float) -> None:
        """One micro batch: its real (non-padding) tokens, its sequences (samples), its token slots (padding
        included: batch rows x width), and values to average over micro batches and ranks (loss, ...)."""
        if not self.names:
            self.names = list(values)
            self.sums = torch.zeros(4 + len(values))
        row = [1.0, float(tokens), float(sequences), float(slots)]
        self.sums += torch.tensor(row + [float(torch.as_tensor(v).detach()) for v in values.values()])

    def flush(self) -> dict[str, float]:
        n, tokens, sequences, slots, *sums = dist.all_reduce_sum(self.sums).tolist()
        elapsed = time.perf_counter() - self.start
        grad_norm = self.engine.get_global_grad_norm()
        metrics = {name: value / max(n, 1) for name, value in zip(self.names, sums, strict=True)}
        metrics |= {
            "lr": self.engine.get_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_s": tokens / elapsed,  # real tokens: padding not counted
            "padding_fraction": 1.0 - tokens / max(slots, 1.0),
            "peak_mem_gib": peak_memory_gib(),
            "optim_state_mib": optimizer_state_mib(self.engine.optimizer),
        }
        if self.peak:
            # Over the whole job's peak; attention at the mean real sequence length.
            flops = flops_per_token(self.engine, tokens / max(sequences, 1))
            metrics["mfu"] = flops * metrics["tokens_per_s"] / (self.peak * dist.world_size())
        self._reset()
        return metrics
