"""Route a causal LM's loss through the fused LM-head cross-entropy kernel, so full logits are never materialised.

`enable_fused_loss(model)` gives the model a forward that accepts ``fused_labels=`` and returns the masked mean loss
computed from the last hidden states and the LM head weight (`kernels.cross_entropy`). Without ``fused_labels`` the
model behaves as before (generation, evaluation). It works with tied embeddings (GPT-2) and under ZeRO-3: the head is
still *called* as a module, so DeepSpeed's hooks gather its partitioned weight for forward and backward.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from distributed_pt.data.sft import IGNORE_INDEX
from distributed_pt.losses.sft import shift_labels


class FusedLossHead(nn.Linear):
    """An `nn.Linear` LM head that, given labels, returns the loss instead of logits."""

    softcap: float | None = None

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return super().forward(hidden)
        from kernels.cross_entropy import fused_linear_cross_entropy

        return fused_linear_cross_entropy(
            hidden, self.weight, labels, bias=self.bias, ignore_index=IGNORE_INDEX, softcap=self.softcap
        )


def use_fused_loss(setting: str) -> bool:
    """`loss.fused`: auto = on CUDA only (on CPU the kernel would run interpreted or as its torch fallback)."""
    return setting == "true" or (setting == "auto" and torch.cuda.is_available())


def enable_fused_loss(model: nn.Module) -> bool:
    """Patch `model` in place; returns False (model untouched) when its head is not a plain `nn.Linear`."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        return False
    head.__class__ = FusedLossHead
    head.softcap = getattr(model.config, "final_logit_softcapping", None)
    original = model.forward

    def forward(self, input_ids=None, attention_mask=None, fused_labels=None, **kwargs):
        if fused_labels is None:
            return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        return self.get_output_embeddings()(out.last_hidden_state, labels=shift_labels(fused_labels))

    model.forward = types.MethodType(forward, model)
    return True
