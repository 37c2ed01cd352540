"""The SFT loss: mean next-token cross-entropy over response tokens (labels != -100)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distributed_pt.data.sft import IGNORE_INDEX


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels → targets aligned with each position's logits: position t predicts token t+1."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def masked_token_mean(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) against unshifted labels (B, T), averaged over non-ignored targets.

    Returns 0 (not NaN) when every target is ignored.
    """
    targets = shift_labels(labels).reshape(-1)
    losses = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return losses / (targets != IGNORE_INDEX).sum().clamp(min=1)


def causal_lm_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, fused: bool):
    """Forward a causal LM and return the masked mean loss over response tokens.

    fused: the model went through `models.fused_loss.enable_fused_loss`; the loss comes from the LM head kernel
    without materialising logits.
    """
    if fused:
        return model(input_ids=input_ids, attention_mask=attention_mask, fused_labels=labels)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return masked_token_mean(logits, labels)
