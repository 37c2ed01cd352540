"""Model-state memory per rank: what the ZeRO paper predicts, and what a DeepSpeed engine actually holds (counted
tensor by tensor). Used by bench_memory.py; the predicted side is the formula a planner calibrates against."""

from __future__ import annotations

import torch

from distributed_pt.engine.metrics import inner_optimizer

_PARAM_ATTRS = ("bit16_groups_flat", "fp16_partitioned_groups_flat", "fp16_groups_flat", "bf16_groups_flat",
                "param_buffer_of_bit16_for_cpu_offload_groups")  # fmt: skip
_GRAD_ATTRS = ("averaged_gradients", "grads_in_partition", "grad_partitions_flat_buffer",
               "fp32_groups_gradients_flat", "accumulated_grads_in_cpu")  # fmt: skip
_MASTER_ATTRS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition",
                 "fp32_groups_flat", "fp32_groups")  # fmt: skip


def zero_model_state_bytes(
    n_params: int, stage: int, world: int, n_trainable: int | None = None, dtype: str = "bf16"
) -> dict[str, float]:
    """Model-state bytes per rank that the ZeRO paper predicts for Adam (Rajbhandari et al. 2020, Fig. 1).

    Mixed precision (bf16/fp16) holds 2Ψ weights + 2Ψ gradients + 12Ψ optimizer state (fp32 master, m, v): 16Ψ at
    stage 0; 4Ψ + 12Ψ/N at stage 1; 2Ψ + 14Ψ/N at stage 2; 16Ψ/N at stage 3. fp32 holds 4Ψ + 4Ψ + 8Ψ (no master).
    Frozen parameters (LoRA) only hold weights: gradient and optimizer terms use ``n_trainable`` (default: all).

    Returns:
        {"params", "grads", "optimizer", "total"} in bytes.
    """
    trainable = n_params if n_trainable is None else n_trainable
    weight_bytes, optim_bytes = (4, 8) if dtype == "fp32" else (2, 12)
    params = weight_bytes * n_params / (world if stage >= 3 else 1)
    grads = weight_bytes * trainable / (world if stage >= 2 else 1)
    optimizer = optim_bytes * trainable / (world if stage >= 1 else 1)
    return {"params": params, "grads": grads, "optimizer": optimizer, "total": params + grads + optimizer}


def _tensors(obj) -> list[torch.Tensor]:
    """Tensors in a tensor, or a list/tuple/dict of them (nested), else none."""
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, list | tuple):
        return [t for o in obj for t in _tensors(o)]
    return []


def model_state_bytes(engine) -> dict[str, dict[str, int]]:
    """This rank's model-state bytes by category and device, each tensor's whole storage counted once.

    * params: each module parameter's storage (under ZeRO-3 its ``ds_tensor`` partition, plus ``data`` when gathered
      or persistent), the optimizer's flat 16-bit buffers and the offload's host copy (``_PARAM_ATTRS``);
    * grads: each parameter's ``.grad``, the ZeRO gradient partitions (``_GRAD_ATTRS``) and the ``.grad`` of the fp32
      master tensors (where offload writes gradients);
    * master: the fp32 master weights (``_MASTER_ATTRS``); moments: every tensor in the innermost torch optimizer's
      ``state`` (Adam ``exp_avg``, ``exp_avg_sq``, ``step``).

    Not counted: activations, communication buckets (``ipg_buffer``), all-gather buffers, temporaries (the paper's
    "residual states"). A view keeps its whole storage alive, so the storage is what is counted.

    Returns:
        {"params" | "grads" | "master" | "moments": {device type: bytes}}; categories are claimed in that order, so
        a storage shared by two (a gradient view of a flat parameter buffer) counts in the first.
    """
    opt = engine.optimizer
    masters = [t for a in _MASTER_ATTRS for t in _tensors(getattr(opt, a, None))]
    params = []
    for p in engine.module.parameters():
        params += [t for t in (getattr(p, "ds_tensor", None), p.data) if t is not None]
    params += [t for a in _PARAM_ATTRS for t in _tensors(getattr(opt, a, None))]
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    grads += [t for a in _GRAD_ATTRS for t in _tensors(getattr(opt, a, None))]
    grads += [m.grad for m in masters if m.grad is not None]
    inner = inner_optimizer(opt)
    moments = [t for state in getattr(inner, "state", {}).values() for t in _tensors(state)]

    seen: set[tuple[str, int]] = set()
    out: dict[str, dict[str, int]] = {}
    for category, tensors in (("params", params), ("grads", grads), ("master", masters), ("moments", moments)):
        per_device = out.setdefault(category, {})
        for t in tensors:
            if t.numel() == 0 or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = (str(t.device), storage.data_ptr())
            if key not in seen:
                seen.add(key)
                per_device[t.device.type] = per_device.get(t.device.type, 0) + storage.nbytes()
    return out
