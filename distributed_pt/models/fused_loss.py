"""Route a causal LM's loss and per-token log-probs through the fused LM-head kernels (no full logits in memory).

`enable_fused_loss(model)` gives the model a forward that accepts ``fused_labels=`` (returns the masked mean SFT
loss) or ``logprob_tokens=`` (returns per-position log pi(token) and entropy), both computed from the last hidden
states and the LM head weight by `kernels.cross_entropy`. Without them the model behaves as before (generation,
evaluation). It works with tied embeddings (GPT-2) and under ZeRO-3: the head is still *called* as a module, so
DeepSpeed's hooks gather its partitioned weight for forward and backward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from distributed_pt.data.sft import IGNORE_INDEX
from distributed_pt.losses.sft import shift_labels


class FusedLossHead(nn.Linear):
    """An `nn.Linear` LM head that, given labels or tokens, returns the loss or the log-probs instead of logits."""

    softcap: float | None = None

    def forward(self, hidden, labels=None, logprob_tokens=None, temperature: float = 1.0):
        from kernels import cross_entropy as ce

        if labels is not None:
            return ce.fused_linear_cross_entropy(
                hidden, self.weight, labels, bias=self.bias, ignore_index=IGNORE_INDEX, softcap=self.softcap
            )
        if logprob_tokens is not None:
            return ce.fused_linear_logprobs(
                hidden, self.weight, logprob_tokens, bias=self.bias, softcap=self.softcap, temperature=temperature,
                return_entropy=True,
            )  # fmt: skip
        return super().forward(hidden)


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

    def forward(
        self, input_ids=None, attention_mask=None, fused_labels=None, logprob_tokens=None, temperature=1.0, **kwargs
    ):
        if fused_labels is None and logprob_tokens is None:  # logits as usual (generation passes its cache here)
            return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        if fused_labels is not None:
            return self.get_output_embeddings()(out.last_hidden_state, labels=shift_labels(fused_labels))
        return self.get_output_embeddings()(
            out.last_hidden_state, logprob_tokens=logprob_tokens, temperature=temperature
        )

    model.forward = types.MethodType(forward, model)
    model._fused_head = True
    return True


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0):
    """log pi(x_{t+1} | x_{<=t}) and the policy's entropy at each position t, both (B, T-1) float32.

    Uses the fused kernel when `model` went through `enable_fused_loss`, else full logits (log_softmax + gather).
    Logits are divided by `temperature`, matching the distribution the tokens were sampled from.
    """
    module = getattr(model, "module", model)
    if getattr(module, "_fused_head", False):
        targets = F.pad(input_ids[:, 1:], (0, 1), value=0)
        logp, entropy = model(
            input_ids=input_ids, attention_mask=attention_mask, logprob_tokens=targets, temperature=temperature
        )
        return logp[:, :-1], entropy[:, :-1]
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    logp_all = F.log_softmax(logits / temperature, dim=-1)
    logp = logp_all.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy
