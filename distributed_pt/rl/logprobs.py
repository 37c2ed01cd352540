"""Per-token log-probs of a policy and of its frozen reference, through the explicit LM-head function."""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial

import torch
from torch import nn

from distributed_pt.models.heads import lm_head_logprobs
from distributed_pt.models.lora import adapters_disabled


def token_logprobs(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float, fused: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(x_{t+1} | x_{<=t}) and entropy at each position t, (B, T-1) float32, of a Backbone (or its engine);
    `fused`: from the LM-head kernel, without full logits."""
    head = partial(lm_head_logprobs, input_ids=input_ids, temperature=temperature, fused=fused)
    return model(input_ids, attention_mask, head=head)


def reference_logprobs(
    actor: nn.Module,
    reference: nn.Module | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float,
    fused: bool,
) -> torch.Tensor:
    """(B, T-1) log-probs of the frozen reference: its own engine, or (None) the LoRA actor with adapters off."""
    with adapters_disabled(actor) if reference is None else nullcontext():
        return token_logprobs(reference or actor, input_ids, attention_mask, temperature, fused)[0]
