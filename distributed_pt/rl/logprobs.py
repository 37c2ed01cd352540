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
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    temperature: float,
    fused: bool,
    position_ids: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(x_{t+1} | x_{<=t}) and entropy at each position t, (B, T-1) float32, of a Backbone (or its engine);
    `fused`: from the LM-head kernel, without full logits. Packed rows: no attention mask, `position_ids` restarting
    at each sample. `targets`: each position's next token given (a sequence-parallel shard); then (B, T)."""
    shifted = targets is not None
    head = partial(lm_head_logprobs, input_ids=targets if shifted else input_ids, temperature=temperature,
                   fused=fused, shifted=shifted)  # fmt: skip
    return model(input_ids, attention_mask, head=head, position_ids=position_ids)


def reference_logprobs(
    actor: nn.Module,
    reference: nn.Module | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    temperature: float,
    fused: bool,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, T-1) log-probs of the frozen reference: its own engine, or (None) the LoRA actor with adapters off, in
    eval mode (no dropout: the reference is a fixed function)."""
    model = reference or actor
    with adapters_disabled(actor) if reference is None else nullcontext(), evaluating(model):
        return token_logprobs(model, input_ids, attention_mask, temperature, fused, position_ids)[0]


def segment_sums(
    values: torch.Tensor, response: torch.Tensor, segment: torch.Tensor, num_segments: int, shifted: bool = False
) -> torch.Tensor:
    """(num_segments,) float32 sums of per-position values (R, T-1) (position t scores token t+1) over the response
    tokens (response (R, T), unshifted) of each sequence (segment (R, T): its index, padded rows or packed samples
    alike; see `data.preference.collate_dpo_pairs`). `shifted`: values, response and segment all (R, W) and aligned
    with the scored token already (a sequence-parallel shard)."""
    keep, segment = (response, segment) if shifted else (response[:, 1:], segment[:, 1:])
    out = torch.zeros(num_segments, dtype=torch.float32, device=values.device)
    return out.index_add(0, segment[keep], values[keep].float())


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode for the block, then back to the mode it had."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
