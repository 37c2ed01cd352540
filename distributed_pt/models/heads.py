"""Model heads, called by name: the LM-head loss, per-token log-probs (+ entropy) and scalar scores, each a function
of the final hidden states and the head module.

    engine = initialize(Backbone(model), ...)                 # DeepSpeed wraps the Backbone
    loss = lm_loss(engine, input_ids, attention_mask, labels, fused=True)
    scores = token_scores(critic_engine, input_ids, attention_mask)        # (B, T)

`Backbone.forward(input_ids, attention_mask, head)` runs the transformer body and returns
``head(hidden (B, T, H), head_module)``. The head functions run inside the engine's forward, so under ZeRO-3 a head
that reads ``head_module.weight`` directly (the fused kernels) has it gathered for forward and backward like any
parameter the forward uses; tied embeddings (GPT-2, the demo's Llama) work the same way. The fused paths never
build the (B, T, V) logits.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distributed_pt.config import ConfigError
from distributed_pt.data.collate import Batch
from distributed_pt.data.sft import IGNORE_INDEX

HeadFn = Callable[[torch.Tensor, nn.Module], Any]


class Backbone(nn.Module):
    """An HF ``*ForCausalLM`` or ``*ForSequenceClassification`` whose forward hands its final hidden states to a head
    function. The HF model is ``self.module`` (generation, export and LoRA reach it through ``models.zero.unwrap``).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        if getattr(module.config, "final_logit_softcapping", None):
            raise ConfigError(f"model: {type(module).__name__} soft-caps its logits, which the explicit heads do not")
        self.module = module

    @property
    def head(self) -> nn.Module:
        """The scalar head (``score``) of a sequence-classification model, else the LM head."""
        score = getattr(self.module, "score", None)
        return score if isinstance(score, nn.Module) else self.module.get_output_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        head: HeadFn,
        position_ids: torch.Tensor | None = None,
    ) -> Any:
        """`head(hidden, head module)`. Packed rows: no attention mask, position ids restarting at each sample (the
        model then masks attention block-diagonally; see `data.packing`)."""
        out = self.module.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return head(out.last_hidden_state, self.head)


def use_fused_loss(setting: str, model: nn.Module) -> bool:
    """`loss.fused`: auto = on CUDA only (on CPU the kernel would run interpreted); never for an LM head that is not
    a plain ``nn.Linear`` (e.g. one LoRA wraps)."""
    wanted = setting == "true" or (setting == "auto" and torch.cuda.is_available())
    return wanted and type(model.get_output_embeddings()) is nn.Linear


# ----------------------------------------------------------------------------------------------------------------------
# Head functions: (hidden (B, T, H), head module, ...) -> outputs.


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels → targets aligned with each position's logits: position t predicts token t+1."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def masked_token_mean(
    logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean", shifted: bool = False
) -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) against labels (B, T; unshifted, or `shifted` already; or (N, V) against
    (N,) targets) over the non-ignored targets (in float32): their mean (0, not NaN, when every target is ignored) or,
    with reduction="sum", their sum."""
    targets = (labels if shifted else shift_labels(labels)).reshape(-1)
    losses = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return losses if reduction == "sum" else losses / (targets != IGNORE_INDEX).sum().clamp(min=1)


def lm_head_loss(
    hidden: torch.Tensor,
    head: nn.Module,
    labels: torch.Tensor,
    fused: bool,
    reduction: str = "mean",
    shifted: bool = False,
) -> torch.Tensor:
    """Next-token cross-entropy over the labelled tokens (labels (B, T), IGNORE_INDEX elsewhere): their mean, or
    their sum with reduction="sum".

    fused: the Triton LM-head kernel, no logits in memory (head must be a plain ``nn.Linear``).
    Otherwise only the positions with a target reach the head: (N, V) logits rather than (B, T, V), so a prompt's and
    the padding's positions cost no LM-head FLOPs or logits memory.
    shifted: `labels` already hold each position's target (a sequence-parallel shard, whose last position predicts the
    next shard's first token).
    """
    targets = labels if shifted else shift_labels(labels)
    if fused:
        from distributed_pt_kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

        return fused_linear_cross_entropy(
            hidden, head.weight, targets, bias=head.bias, ignore_index=IGNORE_INDEX, reduction=reduction
        )
    keep = targets != IGNORE_INDEX
    return masked_token_mean(head(hidden[keep]), targets[keep], reduction, shifted=True)


def lm_head_logprobs(
    hidden: torch.Tensor,
    head: nn.Module,
    input_ids: torch.Tensor,
    temperature: float,
    fused: bool,
    shifted: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(x_{t+1} | x_{<=t}) and the policy's entropy at each position t, both (B, T-1) float32, from logits
    divided by `temperature` (the distribution the tokens were sampled from). `shifted`: `input_ids` already hold
    each position's next token (a sequence-parallel shard, whose last position predicts the next shard's first
    token); then (B, T)."""
    targets = input_ids if shifted else F.pad(input_ids[:, 1:], (0, 1), value=0)
    if fused:
        from distributed_pt_kernels.fused_linear_logprobs import fused_linear_logprobs

        logp, entropy = fused_linear_logprobs(
            hidden, head.weight, targets, bias=head.bias, temperature=temperature, return_entropy=True
        )
    else:
        logp_all = F.log_softmax(head(hidden).float() / temperature, dim=-1)
        logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return (logp, entropy) if shifted else (logp[:, :-1], entropy[:, :-1])


def score_head(hidden: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """The scalar head at every position: (B, T) float32 (a reward model's score, a critic's value)."""
    return head(hidden).squeeze(-1).float()


# ----------------------------------------------------------------------------------------------------------------------
# Calls through a Backbone (or its DeepSpeed engine).


def lm_loss(model: nn.Module, batch: Batch, fused: bool, reduction: str = "mean") -> torch.Tensor:
    """The SFT loss of a (padded or packed) batch: cross-entropy over its response tokens, their mean or sum (see
    `lm_head_loss`)."""
    head = partial(lm_head_loss, labels=batch.labels, fused=fused, reduction=reduction, shifted=batch.shifted)
    return model(batch.input_ids, batch.model_mask, head=head, position_ids=batch.position_ids)


def token_scores(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, T) scalar head outputs at every position (a PPO critic's per-token values; packed rows: the mask None
    and position ids restarting at each sample)."""
    return model(input_ids, attention_mask, head=score_head, position_ids=position_ids)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask → (B,) index of the last non-padding position (works for left and right padding)."""
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(-1)


def sequence_rewards(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) scores at each sequence's last non-padding token (read by us rather than by HF's pooling, which finds
    the last token by comparing ids with pad_token_id and so misreads sequences whose EOS doubles as padding)."""
    scores = token_scores(model, input_ids, attention_mask)
    return scores.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)
