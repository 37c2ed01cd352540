"""ZeRO-3-aware parameter helpers: gather partitioned parameters, count them at full size, unwrap engines."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

_WRAPPER_TYPES = ("Backbone", "DeepSpeedEngine", "PipelineEngine", "DistributedDataParallel", "DataParallel")


def gathered(params: Iterable[torch.Tensor | None], modifier_rank: int | None = None) -> AbstractContextManager:
    """``deepspeed.zero.GatheredParameters`` over the ZeRO-3 partitioned ones among ``params``, else a no-op.

    Collective under ZeRO-3: every rank must enter it with the same parameters. ``modifier_rank``: the rank whose
    in-place changes are broadcast back into the partitions on exit (None: read only).
    """
    params = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def unwrap(model: nn.Module) -> nn.Module:
    """The user model inside a DeepSpeed engine or DDP wrapper (their ``module``), else the model itself."""
    while type(model).__name__ in _WRAPPER_TYPES and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def num_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Parameters (all, or those that train), counting ZeRO-3 partitioned ones at their full size."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters() if p.requires_grad or not trainable_only)
