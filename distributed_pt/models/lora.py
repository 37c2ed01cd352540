"""LoRA adapters built for DeepSpeed ZeRO-3, saved and loaded in PEFT's format.

    names = apply_lora(model, cfg.lora)              # before deepspeed.initialize
    prepare_for_gradient_checkpointing(model)        # when the base is frozen and checkpointing is on
    ...train...
    save_adapter(engine.module, out_dir, cfg.lora)   # every rank calls it; rank 0 writes

ZeRO-3 gathers a module's *direct* parameters in its forward pre-hook. ``LoraLinear`` therefore holds the frozen
``weight``/``bias`` of the layer it replaces and the adapters ``lora_A`` (r, in) and ``lora_B`` (out, r) as its own
parameters, with no ``base_layer`` child: all four are gathered together, and the base model's state-dict keys
(``...q_proj.weight``) stay unchanged. On disk, keys follow PEFT (``base_model.model.<module>.lora_A.weight``;
``modules_to_save`` parameters as ``base_model.model.<module>.<param>``), so ``peft.PeftModel.from_pretrained`` loads
an adapter written here.
"""

from __future__ import annotations

import functools
import json
import math
import re
import warnings
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D  # GPT-2 style linear, weight stored (in, out)

from distributed_pt import dist
from distributed_pt.config import LoraConfig
from distributed_pt.models.zero import gathered, num_parameters, unwrap

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


@functools.cache
def _triton_available() -> bool:
    """Whether the fused kernel imports (kernel="auto" falls back to torch, once warned, when it does not)."""
    try:
        import distributed_pt_kernels.lora_matmul  # noqa: F401
    except ImportError as err:
        warnings.warn(f"kernel='auto': Triton LoRA kernel unavailable ({err}); using the torch path", stacklevel=3)
        return False
    return True


class LoraLinear(nn.Module):
    """A linear layer ``y = x W^T + b + scale * dropout(x) A^T B^T`` with frozen W, b and trainable A, B.

    Replaces an ``nn.Linear`` or a transformers ``Conv1D`` (whose weight is stored transposed, (in, out); kept so,
    ``fan_in_fan_out=True``). The original ``weight``/``bias`` Parameter objects are reused, so ZeRO-3 partition state
    and tied references survive. A is Kaiming-uniform and B zero, as PEFT's default: the layer starts as the original.

    Args:
        base: The layer to replace.
        r: Adapter rank.
        alpha: LoRA alpha; ``scale = alpha / r``.
        dropout: Dropout probability on the adapter path's input.
        kernel: "triton" (fused kernel from ``distributed_pt_kernels.lora_matmul``), "torch", or "auto" (Triton when
            the weight is on CUDA at forward time and the layer is an ``nn.Linear``, else torch).

    Shapes:
        x: (..., in_features) -> (..., out_features). lora_A: (r, in_features); lora_B: (out_features, r).
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, kernel: str = "auto") -> None:
        super().__init__()
        if isinstance(base, nn.Linear):
            in_f, out_f, self.fan_in_fan_out = base.in_features, base.out_features, False
        elif isinstance(base, Conv1D):
            in_f, out_f, self.fan_in_fan_out = base.nx, base.nf, True
        else:
            raise TypeError(f"LoRA supports nn.Linear and transformers Conv1D, got {type(base).__name__}")
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got r={r}")
        if kernel not in ("auto", "triton", "torch"):
            raise ValueError(f"kernel must be 'auto', 'triton' or 'torch', got {kernel!r}")
        self.in_features, self.out_features = in_f, out_f
        self.r, self.alpha, self.scale = r, float(alpha), float(alpha) / r
        self.dropout_p, self.kernel, self.merged, self.disabled = float(dropout), kernel, False, False
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, in_f, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_f, r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, p={self.dropout_p}, "
            f"fan_in_fan_out={self.fan_in_fan_out}, kernel={self.kernel}, merged={self.merged}"
        )

    def _base_weight(self) -> torch.Tensor:
        """W as (out, in)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def _use_triton(self) -> bool:
        if self.kernel == "auto":
            return self.weight.is_cuda and not self.fan_in_fan_out and _triton_available()
        return self.kernel == "triton"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return F.linear(x, self._base_weight(), self.bias)
        if self._use_triton():
            from distributed_pt_kernels.lora_matmul import lora_linear

            return lora_linear(
                x, self._base_weight(), self.lora_A, self.lora_B, self.scale, bias=self.bias,
                dropout_p=self.dropout_p, training=self.training,
            )  # fmt: skip
        out = F.linear(x, self._base_weight(), self.bias)
        h = F.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A)  # (..., r)
        return out + (self.scale * F.linear(h, self.lora_B)).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``scale * B @ A`` in float32, laid out like ``weight`` ((out, in), or (in, out) for Conv1D)."""
        delta = self.scale * (self.lora_B.float() @ self.lora_A.float())
        return delta.t() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def _add_delta(self, sign: float) -> None:
        # ZeRO-3: all ranks gather and compute the same update; rank 0's copy is kept when re-partitioning.
        with gathered([self.weight, self.lora_A, self.lora_B], modifier_rank=0):
            merged = self.weight.float() + sign * self.delta_weight()
            self.weight.data.copy_(merged.to(self.weight.dtype))

    def merge(self) -> None:
        """Add ``scale * B @ A`` into ``weight`` (in float32, then cast); the forward then skips the adapter path."""
        if not self.merged:
            self._add_delta(1.0)
            self.merged = True

    def unmerge(self) -> None:
        """Subtract the adapter from ``weight`` again (exact in float32, to rounding in bf16/fp16)."""
        if self.merged:
            self._add_delta(-1.0)
            self.merged = False

    def to_base(self) -> nn.Module:
        """A plain ``nn.Linear`` (or ``Conv1D``) holding this layer's weight and bias (merge first to keep LoRA)."""
        with torch.device("meta"):  # no throwaway allocation: the parameters are swapped in below
            if self.fan_in_fan_out:
                layer = Conv1D(self.out_features, self.in_features)
            else:
                layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        layer.weight = self.weight
        layer.bias = self.bias
        return layer


def _matches_name(name: str, entries: Iterable[str]) -> str | None:
    """The first entry that is ``name`` or a dotted suffix of it (PEFT's list rule), else None."""
    return next((e for e in entries if name == e or name.endswith("." + e)), None)


def _is_under(name: str, roots: Iterable[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def _resolve_modules_to_save(model: nn.Module, entries: list[str]) -> list[str]:
    """Qualified names of the outermost modules matched by ``entries``; an entry matching nothing is an error."""
    names = [n for n, _ in model.named_modules() if n and _matches_name(n, entries)]
    unmatched = [e for e in entries if not any(_matches_name(n, [e]) for n in names)]
    if unmatched:
        raise ValueError(f"lora.modules_to_save entries {unmatched} match no module of {type(model).__name__}")
    return [n for n in names if not _is_under(n, [o for o in names if o != n])]


def _find_targets(model: nn.Module, cfg: LoraConfig, skip: list[str]) -> tuple[list[tuple[str, nn.Module]], Any]:
    """The (name, module) pairs to replace, and the target_modules value to record in adapter_config.json."""
    targets, used = [], set()
    for name, module in model.named_modules():
        if not name or _is_under(name, skip):
            continue
        if isinstance(cfg.target_modules, str):
            hit = cfg.target_modules if re.fullmatch(cfg.target_modules, name) else None
        else:
            hit = _matches_name(name, cfg.target_modules)
        if hit is not None:
            targets.append((name, module))
            used.add(hit)
    linear = (nn.Linear, Conv1D)
    if not targets:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, linear)})
        raise ValueError(
            f"lora.target_modules={cfg.target_modules!r} matches no module of {type(model).__name__}. "
            f"Its linear layers are named: {names} (list entries match a name or dotted suffix of the qualified name; "
            "a string is a regex matched in full against the qualified name)"
        )
    wrong = [f"{n} ({type(m).__name__})" for n, m in targets if not isinstance(m, linear)]
    if wrong:
        raise ValueError(f"lora.target_modules matches modules that are not nn.Linear/Conv1D: {wrong[:8]}")
    if isinstance(cfg.target_modules, str):
        return targets, cfg.target_modules
    unused = [e for e in cfg.target_modules if e not in used]
    if unused:
        warnings.warn(f"lora.target_modules entries {unused} match no module", stacklevel=3)
    return targets, sorted(used)


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Replace the matched linear layers by ``LoraLinear`` and freeze all else but the adapters and modules_to_save.

    Call before ``deepspeed.initialize`` (ZeRO-3 partitions the new adapter parameters there; an already partitioned
    base weight is reused as is). Modules under ``modules_to_save`` are never LoRA targets, as in PEFT.

    Args:
        model: A model (or a DeepSpeed/DDP wrapper around it), changed in place.
        cfg: The LoRA section: target_modules, modules_to_save, r, alpha, dropout, kernel.

    Returns:
        The qualified names of the replaced modules.

    Raises:
        ValueError: when nothing matches (the message lists the model's linear layer names), when a match is not a
            linear layer, or when a modules_to_save entry matches nothing.
    """
    model = unwrap(model)
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise RuntimeError("apply_lora: the model already has LoRA layers")
    save = _resolve_modules_to_save(model, list(cfg.modules_to_save))
    targets, recorded = _find_targets(model, cfg, save)
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoraLinear(module, cfg.r, cfg.alpha, cfg.dropout, cfg.kernel))
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
    for name in save:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    # Plain attributes (not state): what save_adapter records and lora_state_dict saves.
    model._lora_target_modules = recorded
    model._lora_modules_to_save = save
    return [name for name, _ in targets]


def prepare_for_gradient_checkpointing(model: nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Make the input embeddings' output require grad, so reentrant checkpointing back-propagates to the adapters.

    With a frozen base, no input of a checkpointed block requires grad, and reentrant checkpointing then computes no
    gradient inside it (the same fix as HF's ``enable_input_require_grads``). Harmless with non-reentrant
    checkpointing. Idempotent: a second call returns the first hook's handle.
    """
    model = unwrap(model)
    handle = getattr(model, "_lora_input_grad_hook", None)
    if handle is not None:
        return handle
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if emb is None:
        raise ValueError(f"{type(model).__name__} has no input embedding to hook")

    def _require_grad(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        output.requires_grad_(True)

    model._lora_input_grad_hook = emb.register_forward_hook(_require_grad)
    return model._lora_input_grad_hook


def _adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT key -> live tensor (Parameter or buffer) for every adapter and modules_to_save entry."""
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B
    for name in getattr(model, "_lora_modules_to_save", []):
        for key, t in model.get_submodule(name).state_dict(keep_vars=True).items():
            out[f"{PEFT_PREFIX}{name}.{key}"] = t
    return out


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter (and modules_to_save) weights under PEFT's saved key names, as full CPU copies.

    Collective under ZeRO-3 (each parameter is gathered): call it on every rank.

    Returns:
        ``{"base_model.model.<module>.lora_A.weight": (r, in), "...lora_B.weight": (out, r),
        "base_model.model.<saved module>.<param>": ...}``.
    """
    out = {}
    for key, t in _adapter_tensors(unwrap(model)).items():
        with gathered([t]):
            out[key] = t.detach().to("cpu", copy=True)
    return out


def adapter_config(
    model: nn.Module, cfg: LoraConfig, base_model_name_or_path: str | None = None, task_type: str = "CAUSAL_LM"
) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` content for the LoRA layers of ``model``."""
    model = unwrap(model)
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    if not layers:
        raise ValueError("adapter_config: the model has no LoRA layers (call apply_lora first)")
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    save = list(cfg.modules_to_save) or None
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": cfg.r,
        "lora_alpha": alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": getattr(model, "_lora_target_modules", cfg.target_modules),
        "modules_to_save": save,
        "fan_in_fan_out": all(m.fan_in_fan_out for m in layers),
        "bias": "none",
        "init_lora_weights": True,
    }


def save_adapter(
    model: nn.Module,
    out_dir: str | Path,
    cfg: LoraConfig,
    base_model_name_or_path: str | None = None,
    task_type: str = "CAUSAL_LM",
) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT format) to ``out_dir``.

    Every rank must call it (ZeRO-3 gathers); rank 0 writes; all ranks wait at a barrier until the files exist.
    """
    from safetensors.torch import save_file

    config = adapter_config(model, cfg, base_model_name_or_path, task_type)
    state = lora_state_dict(model)
    if dist.is_main():
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / ADAPTER_WEIGHTS_NAME), {"format": "pt"})
        (out / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _read_adapter(adapter_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights under normalized PEFT keys, adapter_config.json content or {})."""
    if (adapter_dir / ADAPTER_WEIGHTS_NAME).exists():
        from safetensors.torch import load_file

        state = load_file(str(adapter_dir / ADAPTER_WEIGHTS_NAME))
    elif (adapter_dir / "adapter_model.bin").exists():
        state = torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS_NAME} (or adapter_model.bin) in {adapter_dir}")
    # Accept keys as they sit inside a PeftModel too (with the adapter name "default").
    norm = {}
    for key, t in state.items():
        key = re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1.weight", key).replace(".modules_to_save.default.", ".")
        norm[key if key.startswith(PEFT_PREFIX) else PEFT_PREFIX + key] = t
    config_path = adapter_dir / ADAPTER_CONFIG_NAME
    return norm, json.loads(config_path.read_text()) if config_path.exists() else {}


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> None:
    """Load a PEFT-format adapter (as written by ``save_adapter`` or PEFT) into a model passed through apply_lora.

    Collective under ZeRO-3 (each parameter is gathered and re-partitioned): call it on every rank.

    Raises:
        ValueError: when the adapter's keys differ from the model's adapter parameters (missing or unexpected keys,
            e.g. another target_modules or modules_to_save), when a shape differs (another r), or when the saved
            lora_alpha/r differ from the model's.
    """
    model, adapter_dir = unwrap(model), Path(adapter_dir)
    live = _adapter_tensors(model)
    if not live:
        raise ValueError("load_adapter: the model has no LoRA layers (call apply_lora first)")
    state, saved = _read_adapter(adapter_dir)
    unsupported = [k for k in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern") if saved.get(k)]
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
    alpha, r = saved.get("lora_alpha", 8), saved.get("r", layer.r)  # 8: PEFT's default alpha
    if unsupported or not math.isclose(alpha / r, layer.scale):
        raise ValueError(
            f"{adapter_dir}: unsupported {unsupported} or lora_alpha/r = {alpha}/{r} where the model's LoRA layers "
            f"use {layer.alpha}/{layer.r}; set lora.r and lora.alpha to the adapter's values"
        )
    missing, unexpected = sorted(set(live) - set(state)), sorted(set(state) - set(live))
    if missing or unexpected:
        raise ValueError(
            f"adapter {adapter_dir} does not fit the model: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]} (check lora.target_modules and lora.modules_to_save)"
        )
    shapes = {k: tuple(getattr(t, "ds_shape", t.shape)) for k, t in live.items()}  # full shapes under ZeRO-3
    wrong = [f"{k}: {tuple(state[k].shape)} vs {shape}" for k, shape in shapes.items() if state[k].shape != shape]
    if wrong:
        raise ValueError(f"adapter {adapter_dir} has shapes that differ from the model's (another r?): {wrong[:5]}")
    with torch.no_grad():
        for key, t in live.items():
            with gathered([t], modifier_rank=0):
                t.data.copy_(state[key].to(device=t.device, dtype=t.dtype))


@contextmanager
def adapters_disabled(model: nn.Module):
    """Run the base model alone (e.g. as PPO's frozen reference: the same weights, no second copy)."""
    layers = [m for m in unwrap(model).modules() if isinstance(m, LoraLinear)]
    if any(m.merged for m in layers):
        raise RuntimeError("adapters_disabled: unmerge the LoRA layers first (merged weights contain the adapters)")
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m in layers:
            m.disabled = False


def merge_lora(model: nn.Module) -> None:
    """Merge every LoRA layer into its weight (collective under ZeRO-3)."""
    for module in unwrap(model).modules():
        if isinstance(module, LoraLinear):
            module.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo ``merge_lora`` (collective under ZeRO-3)."""
    for module in unwrap(model).modules():
        if isinstance(module, LoraLinear):
            module.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge each LoRA layer and put a plain ``nn.Linear``/``Conv1D`` back in its place, for ``save_pretrained``.

    For a model outside a ZeRO-3 engine (the engine's hooks sit on the replaced modules); under ZeRO-3 export with
    ``merged_state_dict`` instead.
    """
    model = unwrap(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLinear):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.to_base())
    for attr in ("_lora_target_modules", "_lora_modules_to_save"):
        model.__dict__.pop(attr, None)
    return model


def merged_state_dict(model: nn.Module, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """The base model's state dict on CPU with each adapter merged into its weight, without changing the model.

    Collective under ZeRO-3 (gathers every parameter, one at a time): call it on every rank. Keys are the base
    model's own (``...q_proj.weight``; no ``lora_A``/``lora_B``), ready for ``save_pretrained(state_dict=...)``.

    Args:
        model: A model passed through ``apply_lora`` (or its engine).
        rank0_only: Other ranks take part in gathering but return an empty dict.
    """
    model = unwrap(model)
    keep = not rank0_only or dist.rank() == 0
    lora_of = {id(m.weight): m for m in model.modules() if isinstance(m, LoraLinear)}  # also finds tied copies
    adapters = {id(p) for m in lora_of.values() for p in (m.lora_A, m.lora_B)}
    out: dict[str, torch.Tensor] = {}
    done: dict[int, torch.Tensor] = {}  # tied tensors are gathered once
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) in adapters:
            continue
        if id(t) not in done:
            layer = lora_of.get(id(t))
            with torch.no_grad(), gathered([t] if layer is None else [t, layer.lora_A, layer.lora_B]):
                if not keep:
                    value = torch.empty(0)
                elif layer is not None and not layer.merged:
                    value = (t.float() + layer.delta_weight()).to(t.dtype).cpu()
                else:
                    value = t.detach().to("cpu", copy=True)
            done[id(t)] = value
        if keep:
            out[key] = done[id(t)]
    return out


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; full sizes under ZeRO-3 (``ds_numel``), shared parameters once."""
    model = unwrap(model)
    return num_parameters(model, trainable_only=True), num_parameters(model)
