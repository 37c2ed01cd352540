"""Per-token log-probs of a policy and of its frozen reference, through the explicit LM-head function."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
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
    """(B, T-1) log-probs of the frozen reference: its own engine, or (None) the LoRA actor with adapters off, in
    eval mode (no dropout: the reference is a fixed function)."""
    model = reference or actor
    with adapters_disabled(actor) if reference is None else nullcontext(), evaluating(model):
        return token_logprobs(model, input_ids, attention_mask, temperature, fused)[0]


def sequence_logprobs(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor, fused: bool
) -> torch.Tensor:
    """(B,) float32 sum of log pi over each row's response tokens (response_mask (B, T) marks them, unshifted)."""
    return masked_sum(token_logprobs(model, input_ids, attention_mask, 1.0, fused)[0], response_mask)


def masked_sum(logp: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Per-row sum of (B, T-1) per-position log-probs over the response tokens they predict (mask (B, T))."""
    return (logp * response_mask[:, 1:]).sum(1)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode for the block, then back to the mode it had."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
