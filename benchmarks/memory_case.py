"""One bench_memory case: the size presets, the case record, and what each rank runs (``--child``): build the model
through the framework's own path, train a few steps in a DeepSpeed engine, count its model state."""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
import traceback
import warnings

import torch

from benchmarks.zero_accounting import model_state_bytes, zero_model_state_bytes

LORA_R = 16
# Llama-style shapes. 1b/3b/8b: Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B; 125m: GPT-3-small widths with Llama blocks.
PRESETS: dict[str, dict] = {
    "micro": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=128, tie_word_embeddings=False),  # 6,448 params: for the tests
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=False),  # 4.2M
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=5, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=True),  # 30M
    "125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=32000, tie_word_embeddings=False),  # 134M
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),  # 1.24B
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),  # 3.21B
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),  # 8.03B
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Case:
    """One measurement: a model size under one ZeRO setting, trained in one mode."""

    size: str
    seq: int
    micro_batch: int
    zero: int
    offload: bool
    ckpt: bool
    world: int
    mode: str
    dtype: str = "bf16"

    def fields(self) -> dict:
        """The record's case fields (the mode is the provider)."""
        return dict(
            size=self.size,
            seq=self.seq,
            mb=self.micro_batch,
            zero=self.zero,
            offload="on" if self.offload else "off",
            ckpt="on" if self.ckpt else "off",
            world=self.world,
        )


class _VocabOnly:
    """What ``load_model`` reads from a tokenizer: its length and special ids (random token ids need no more)."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __len__(self) -> int:
        return self.vocab


def is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(
        s in text for s in ("out of memory", "can't allocate memory", "not enough memory")
    )


def _build(case: Case, device: torch.device):
    """The model as users build it: load_model from an init_config, then per mode our LoRA (+ the fused loss) or
    PEFT's. Returns (model, fused)."""
    from distributed_pt.config import LoraConfig, ModelConfig
    from distributed_pt.models.heads import use_fused_loss
    from distributed_pt.models.loading import load_model
    from distributed_pt.models.lora import apply_lora, prepare_for_gradient_checkpointing

    preset = PRESETS[case.size]
    init = {"model_type": "llama", **preset, "max_position_embeddings": max(case.seq, 128)}
    cfg = ModelConfig(init_config=init, dtype=case.dtype, gradient_checkpointing=case.ckpt)
    with device:  # random init where the model will live (8B on CPU first would take minutes)
        model = load_model(cfg, _VocabOnly(preset["vocab_size"]))
        if case.mode == "peft":
            model = with_peft_lora(model)
        elif case.mode != "full":
            kernel = "triton" if case.mode == "lora_fused" else "torch"
            apply_lora(model, LoraConfig(enabled=True, r=LORA_R, alpha=2.0 * LORA_R, kernel=kernel))
            if case.ckpt:
                prepare_for_gradient_checkpointing(model)
    fused = case.mode == "lora_fused" and use_fused_loss("true", model)
    return model, fused


def with_peft_lora(model: torch.nn.Module) -> torch.nn.Module:
    """PEFT's LoRA as its users apply it (r=16, alpha=32, no dropout, on the projections our LoRA targets), returning
    the HF model inside the PeftModel with PEFT's ``lora.Linear`` layers in place.

    ``Backbone`` needs the HF ``*ForCausalLM`` (``base_model`` → the body, ``get_output_embeddings`` → the head): a
    PeftModel's ``base_model`` is its LoraModel, whose forward returns logits. ``get_peft_model`` freezes the base,
    casts the adapters to float32 (``autocast_adapter_dtype``; DeepSpeed's bf16 engine casts them back) and, as the
    model has gradient checkpointing on, calls ``enable_input_require_grads`` itself.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from distributed_pt.config import LoraConfig

    targets = list(LoraConfig().target_modules)  # the 7 attention and MLP projections, as for the lora modes
    cfg = PeftLoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, target_modules=targets, lora_dropout=0.0)
    with warnings.catch_warnings():  # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, cfg).base_model.model


def _engine(case: Case, device: torch.device):
    """The model as users train it, inside a DeepSpeed engine from configs/deepspeed/zero<stage>.json. Returns
    (engine, fused)."""
    from distributed_pt.config import DeepSpeedConfig, OptimConfig, TrainConfig
    from distributed_pt.engine.deepspeed import build_ds_config, initialize
    from distributed_pt.models.heads import Backbone

    torch.manual_seed(0)  # the same weights on every rank
    model, fused = _build(case, device)
    offload = True if case.offload else None  # None keeps the JSON's setting (none)
    ds = DeepSpeedConfig(
        config=f"configs/deepspeed/zero{case.zero}.json", zero_stage=case.zero, offload_optimizer=offload
    )
    train = TrainConfig(micro_batch_size=case.micro_batch, gradient_accumulation_steps=1)
    optim = OptimConfig()
    ds_config = build_ds_config(ds, train, optim, case.dtype, case.world)
    return initialize(Backbone(model), ds_config, optim, 100), fused


def _measure(case: Case, steps: int, mem_cap_gib: float | None, out: dict) -> None:
    """Build, initialize and train one case on this rank, filling ``out`` (partly filled when it fails)."""
    from distributed_pt import dist
    from distributed_pt.data.collate import Batch
    from distributed_pt.data.sft import IGNORE_INDEX
    from distributed_pt.engine.metrics import flops_per_token, peak_flops
    from distributed_pt.models.heads import lm_loss
    from distributed_pt.models.lora import count_trainable

    cuda = torch.cuda.is_available()
    preset = PRESETS[case.size]
    meta, _ = _build(case, torch.device("meta"))  # exact counts before any memory is spent
    n_trainable, n_params = count_trainable(meta)
    flops = flops_per_token(meta, case.seq)
    predicted = zero_model_state_bytes(n_params, case.zero, case.world, n_trainable, case.dtype)
    out.update(n_params=n_params, n_trainable=n_trainable, predicted=predicted)
    if not cuda and mem_cap_gib is not None and predicted["total"] > mem_cap_gib * 2**30:
        raise torch.OutOfMemoryError(
            f"predicted model state {predicted['total'] / 2**30:.2f} GiB > memory cap {mem_cap_gib:.2f} GiB per rank"
        )

    dist.init_distributed()
    device = dist.device()
    if cuda and mem_cap_gib is not None:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, mem_cap_gib * 2**30 / total), device)
    engine, fused = _engine(case, device)
    gen = torch.Generator().manual_seed(1 + dist.rank())  # each rank its own random tokens
    ids = torch.randint(0, preset["vocab_size"], (case.micro_batch, case.seq), generator=gen).to(device)
    mask, labels = torch.ones_like(ids), ids.clone()
    labels[:, : case.seq // 4] = IGNORE_INDEX  # a prompt quarter, as in SFT: the loss covers the response tokens only
    batch = Batch(ids, mask, labels)

    def step(account: bool = False) -> dict | None:
        loss = lm_loss(engine, batch, fused)
        engine.backward(loss)
        state = model_state_bytes(engine) if account else None
        engine.step()
        if cuda:
            torch.cuda.synchronize()
        return state

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step()
    out["measured"] = step(account=True)  # the 2nd step: Adam's moments exist, gradients not yet consumed
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    out["step_s"] = statistics.median(times)
    if cuda:
        out["peak_alloc"] = torch.cuda.max_memory_allocated()
        out["peak_reserved"] = torch.cuda.max_memory_reserved()
        if peak_flops():
            out["mfu"] = 100 * flops * case.micro_batch * case.seq / out["step_s"] / peak_flops()
    dist.destroy()


def run_child(spec: dict) -> dict:
    """One rank of one case (``--child``): its measurements, or status oom/error with a note; never raises."""
    result = {"rank": int(os.environ.get("RANK", 0)), "status": "ok"}
    try:
        _measure(Case(**spec["case"]), spec["steps"], spec.get("mem_cap_gib"), result)
    except Exception as err:  # noqa: BLE001 - every failure becomes a record, the sweep goes on
        first = (str(err).strip().splitlines() or [""])[0][:300]
        result.update(status="oom" if is_oom(err) else "error", note=f"{type(err).__name__}: {first}")
        if result["status"] == "error":
            traceback.print_exc()
    return result
