"""vLLM rollouts colocated on the training ranks. Every vLLM call the framework makes lives in this module.

Each rank (or each group of `rollout.tensor_parallel_size` consecutive ranks) runs its own in-process vLLM engine
(`distributed_executor_backend="external_launcher"`, on top of the process group DeepSpeed made), loaded from
`model.path`. Before generating, the actor's current weights are pushed in when the actor has stepped since the last
push: in buckets of whole transformer blocks of about `rollout.sync_bucket_mib` (so a layer vLLM fuses, e.g. q/k/v
into qkv_proj, always arrives in one call), ZeRO-3 parameters gathered one module at a time, LoRA adapters merged into
the base weights pushed (after the first push, only the modules that train and their siblings). A weight shared by
two vLLM layers (tied embeddings) has the second layer's kernel state rebuilt, and the prefix cache is reset after
each push.
On CUDA (`rollout.sleep`) the engine sleeps while the actor trains: its KV cache is freed, and its weights are
offloaded (LoRA: only some are pushed again) or dropped (full fine-tuning: all are pushed again).

Log-probs come back as `logprobs_mode="processed_logprobs"` (after temperature), the same quantity the trainer
computes. Sampling is seeded per request (`seed` + index), so a resumed run draws the same rollouts.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from distributed_pt import dist
from distributed_pt.models.lora import LoraLinear
from distributed_pt.models.zero import gathered, unwrap
from distributed_pt.rl.engines import Completions, until_eos

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # before vllm is imported: its start-up INFO lines are many
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from transformers import PreTrainedTokenizerBase

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# Partial pushes leave most layers without new weights on purpose; vLLM warns about each of them every time.
logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)


class VLLMEngine:
    """A colocated vLLM engine that samples the actor's current weights. See the module docstring."""

    def __init__(self, cfg: Any, actor: DeepSpeedEngine, tokenizer: PreTrainedTokenizerBase) -> None:
        r = cfg.rollout
        self.actor, self.eos_id = actor, tokenizer.eos_token_id
        self.tp, self.bucket_bytes = r.tensor_parallel_size, r.sync_bucket_mib << 20
        if dist.world_size() % self.tp:
            raise ValueError(f"rollout.tensor_parallel_size={self.tp} must divide the world size {dist.world_size()}")
        section = cfg.grpo if cfg.stage == "grpo" else cfg.ppo
        max_len = r.max_model_len or cfg.data.max_length + max(section.max_new_tokens, cfg.eval.max_new_tokens)
        kwargs: dict[str, Any] = {
            "model": cfg.model.path,
            "skip_tokenizer_init": True,  # token ids in and out; our tokenizer decodes
            "dtype": DTYPES[cfg.model.dtype],
            "trust_remote_code": cfg.model.trust_remote_code,
            "seed": cfg.train.seed,
            "distributed_executor_backend": "external_launcher",
            "tensor_parallel_size": self.tp,
            "max_model_len": max_len,
            "enforce_eager": r.enforce_eager,
            "enable_prefix_caching": True,  # a GRPO group shares its prompt
            "logprobs_mode": "processed_logprobs",
        }
        self.sleeps = torch.cuda.is_available() and r.sleep
        # Level 2 drops the weights too: fine when every weight is pushed again (full fine-tuning); LoRA keeps them.
        self.sleep_level = 2 if all(p.requires_grad for p in actor.module.parameters()) else 1
        if torch.cuda.is_available():
            kwargs |= {"gpu_memory_utilization": r.gpu_memory_utilization, "enable_sleep_mode": self.sleeps}
        else:
            kwargs["kv_cache_memory_bytes"] = int(r.cpu_kv_cache_gib * 2**30)
        start = time.perf_counter()
        self.llm = LLM(**kwargs)
        dist.print0(f"vLLM engine: {cfg.model.path} on every rank (tensor parallel {self.tp}, max_model_len {max_len}) "
                    f"in {time.perf_counter() - start:.1f} s")  # fmt: skip
        dist.before_destroy(self.close)
        self.synced_step: int | None = None  # the actor's global step whose weights the engine holds
        self.asleep = self.weights_awake = False
        self._sleep()

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        greedy: bool,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> Completions:
        sync_time = self.sync()
        start = time.perf_counter()
        self._wake()
        params = [
            SamplingParams(
                max_tokens=max_new_tokens,
                temperature=0.0 if greedy else temperature,
                top_p=1.0 if greedy else top_p,
                seed=None if greedy else seed + i,
                stop_token_ids=[self.eos_id],
                logprobs=0,  # the sampled token's own log-prob
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        mine = slice(None)
        if self.tp > 1:  # the ranks of one tensor-parallel engine must submit the same requests: all of theirs
            prompts, params, mine = self._group_requests(prompts, params)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        tokens, logprobs = [], []
        for out in outs[mine]:
            ids = until_eos(list(out.outputs[0].token_ids), self.eos_id)
            tokens.append(ids)
            logprobs.append([step[t].logprob for t, step in zip(ids, out.outputs[0].logprobs, strict=False)])
        self._sleep()
        return Completions(tokens, logprobs, time.perf_counter() - start, sync_time)

    @torch.no_grad()
    def sync(self) -> float:
        """Push the actor's weights in if it has stepped since the last push (collective under ZeRO-3: every rank
        calls it at the same point). Returns the seconds it took (0 when nothing was pushed)."""
        step = self.actor.global_steps
        if step == self.synced_step:
            return 0.0
        start = time.perf_counter()
        if self.asleep and not self.weights_awake:
            self.llm.wake_up(tags=["weights"])
            self.weights_awake = True
        entries = modules_in_blocks(unwrap(self.actor))
        # After the first push, the modules that train, and their siblings: vLLM fuses siblings (q/k/v, gate/up) into
        # one layer, which must get all its parts in one push.
        training = {parent(name) for name, module, _ in entries if any(p.requires_grad for p in module.parameters())}
        everything = self.synced_step is None
        bucket: list[tuple[str, torch.Tensor]] = []
        size, block, seen = 0, None, set()
        for name, module, block_of in entries:
            if block_of != block and size >= self.bucket_bytes:
                self._push(bucket)
                bucket, size = [], 0
            block = block_of
            if everything or parent(name) in training:
                for key, tensor in module_weights(name, module, seen):
                    bucket.append((key, tensor))
                    size += tensor.numel() * tensor.element_size()
        self._push(bucket)
        self.llm.apply_model(rebuild_tied_layers)
        self.llm.reset_prefix_cache()
        self.synced_step = step
        return time.perf_counter() - start

    def _push(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        if weights:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})

    def _group_requests(self, prompts: list[list[int]], params: list[Any]) -> tuple[list, list, slice]:
        """Every rank's requests in this rank's tensor-parallel group, and which of them are this rank's."""
        from vllm.distributed.parallel_state import get_tp_group

        group = get_tp_group()
        gathered_requests: list[Any] = [None] * self.tp
        torch.distributed.all_gather_object(gathered_requests, (prompts, params), group=group.cpu_group)
        before = sum(len(p) for p, _ in gathered_requests[: group.rank_in_group])
        all_prompts = [p for ps, _ in gathered_requests for p in ps]
        all_params = [s for _, ss in gathered_requests for s in ss]
        return all_prompts, all_params, slice(before, before + len(prompts))

    def _sleep(self) -> None:
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = True

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"] if self.weights_awake else None)
            self.asleep = self.weights_awake = False

    def close(self) -> None:
        """Shut the engine down (it destroys the process group with its own)."""
        self.llm.llm_engine.engine_core.shutdown()


def modules_in_blocks(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, module, block) of every module holding parameters of its own (LoRA layers as one), where block is the
    name up to the first numbered part ("model.layers.3"), or the module's name outside numbered blocks."""
    out = []
    inside_lora: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in inside_lora:
            continue
        if isinstance(module, LoraLinear):
            inside_lora.update(id(m) for m in module.modules() if m is not module)
        elif not any(True for _ in module.parameters(recurse=False)):
            continue
        parts = name.split(".")
        cut = next((i + 1 for i, part in enumerate(parts) if part.isdigit()), len(parts))
        out.append((name, module, ".".join(parts[:cut])))
    return out


def parent(name: str) -> str:
    return name.rpartition(".")[0]


def module_weights(name: str, module: nn.Module, seen: set[int]) -> list[tuple[str, torch.Tensor]]:
    """Checkpoint-named copies of `module`'s own parameters not in `seen` (ids; a tied weight goes once, under its
    first name), gathered (ZeRO-3); a LoRA layer's weight with its adapter merged (the adapter is no checkpoint
    weight)."""
    prefix = f"{name}." if name else ""
    if isinstance(module, LoraLinear):
        with gathered([module.weight, module.bias, module.lora_A, module.lora_B]):
            weight = module.weight if module.merged else (module.weight.float() + module.delta_weight())
            out = [(prefix + "weight", weight.to(module.weight.dtype).detach().clone())]
            if module.bias is not None:
                out.append((prefix + "bias", module.bias.detach().clone()))
            return out
    params = [(key, p) for key, p in module.named_parameters(recurse=False) if id(p) not in seen]
    seen.update(id(p) for _, p in params)
    with gathered([p for _, p in params]):
        return [(prefix + key, p.detach().clone()) for key, p in params]


def rebuild_tied_layers(model: nn.Module) -> None:
    """Re-run the weight post-processing of vLLM layers that share their weight with an earlier layer (a tied LM
    head): reloading runs it for the layer the checkpoint name belongs to only, leaving the other's kernel state
    (e.g. the CPU GEMM's packed copy) stale."""
    seen: set[int] = set()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        if id(weight) in seen and getattr(module, "quant_method", None) is not None:
            module.quant_method.process_weights_after_loading(module)
        seen.add(id(weight))
