"""LoRA layers against PEFT: same outputs and gradients, PEFT-loadable adapters, merge, ZeRO-3 gathering."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():  # set for the whole process: on a GPU it would make every later kernel
    os.environ.setdefault(
        "TRITON_INTERPRET", "1"
    )  # interpreted (before distributed_pt_kernels.lora_matmul is imported)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

peft = pytest.importorskip("peft")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification  # noqa: E402,I001
from transformers.pytorch_utils import Conv1D  # noqa: E402

from distributed_pt.config import LoraConfig  # noqa: E402
from distributed_pt.models.lora import (  # noqa: E402
    LoraLinear,
    adapters_disabled,
    apply_lora,
    count_trainable,
    load_adapter,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    merged_state_dict,
    prepare_for_gradient_checkpointing,
    save_adapter,
    unmerge_lora,
)

REPO = Path(__file__).resolve().parents[3]
LLAMA = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, vocab_size=101,
    intermediate_size=64, max_position_embeddings=64,
)  # fmt: skip


def tiny_llama(seed: int = 0, cls: type = LlamaForCausalLM, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return cls(LlamaConfig(**LLAMA, **kw)).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=101, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def randomize_b(model: nn.Module, seed: int = 1) -> None:
    """B starts at zero; make the adapters matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def input_ids(batch: int = 2, seq: int = 7) -> torch.Tensor:
    return torch.randint(0, 101, (batch, seq), generator=torch.Generator().manual_seed(3))


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def make_layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "conv1d":
        layer = Conv1D(40, 24)
        nn.init.normal_(layer.bias)
        return layer
    return nn.Linear(24, 40, bias=kind == "linear")


@pytest.mark.parametrize("kind", ["linear", "linear_nobias", "conv1d"])
def test_matches_peft_layer(kind: str) -> None:
    base = make_layer(kind)
    theirs = peft.get_peft_model(
        Holder(copy.deepcopy(base)),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], fan_in_fan_out=kind == "conv1d"),
    )
    ours = LoraLinear(copy.deepcopy(base), r=4, alpha=8)
    layer = theirs.base_model.model.proj
    with torch.no_grad():
        nn.init.normal_(layer.lora_B["default"].weight)
        ours.lora_A.copy_(layer.lora_A["default"].weight)
        ours.lora_B.copy_(layer.lora_B["default"].weight)
    x = torch.randn(3, 5, 24)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = theirs(x1), ours(x2)
    torch.testing.assert_close(y2, y1)
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad)
    torch.testing.assert_close(ours.lora_A.grad, layer.lora_A["default"].weight.grad)
    torch.testing.assert_close(ours.lora_B.grad, layer.lora_B["default"].weight.grad)
    assert ours.weight.grad is None and not ours.weight.requires_grad


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_unmerge_and_unload(kind: str) -> None:
    layer = LoraLinear(make_layer(kind), r=4, alpha=16)
    nn.init.normal_(layer.lora_B)
    w0 = layer.weight.detach().clone()
    x = torch.randn(4, 24)
    y = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y)
    assert not torch.equal(layer.weight, w0)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0)
    torch.testing.assert_close(layer(x), y)
    holder = merge_and_unload(Holder(layer))
    assert type(holder.proj) is (Conv1D if kind == "conv1d" else nn.Linear)
    torch.testing.assert_close(holder(x), y)


def test_apply_lora_llama() -> None:
    model = tiny_llama()
    ref = copy.deepcopy(model)
    _, total0 = count_trainable(model)
    names = apply_lora(model, LoraConfig(r=4, alpha=8))
    assert len(names) == 2 * 7 and "model.layers.0.self_attn.q_proj" in names
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable) and len(trainable) == 28
    n_train, total = count_trainable(model)
    assert total == total0 + n_train and n_train == sum(4 * (m.in_features + m.out_features) for m in _loras(model))
    # Base state-dict keys are unchanged; output is unchanged at init.
    assert set(ref.state_dict()) <= set(model.state_dict())
    ids = input_ids()
    torch.testing.assert_close(model(ids).logits, ref(ids).logits)
    with pytest.raises(RuntimeError, match="already"):
        apply_lora(model, LoraConfig())


def test_adapters_disabled_gives_the_base_models_logprobs() -> None:
    """PPO's LoRA reference: the actor with adapters off scores tokens exactly as the base model does."""
    from distributed_pt.models.heads import Backbone
    from distributed_pt.rl.logprobs import token_logprobs

    def logprobs(m):
        return token_logprobs(Backbone(m), ids, mask, temperature=1.0, fused=False)

    base = tiny_llama()
    model = copy.deepcopy(base)
    apply_lora(model, LoraConfig(r=4, alpha=8))
    randomize_b(model)
    ids, mask = input_ids(), torch.ones(2, 7, dtype=torch.long)
    with torch.no_grad():
        base_lp, _ = logprobs(base)
        adapted_lp, _ = logprobs(model)
        with adapters_disabled(model):
            ref_lp, _ = logprobs(model)
        after_lp, _ = logprobs(model)
    torch.testing.assert_close(ref_lp, base_lp)
    assert (adapted_lp - base_lp).abs().max() > 1e-3  # the adapters do matter
    torch.testing.assert_close(after_lp, adapted_lp)  # and come back on leaving the context
    merge_lora(model)
    with pytest.raises(RuntimeError, match="unmerge"), adapters_disabled(model):
        pass


def _loras(model: nn.Module) -> list[LoraLinear]:
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def test_apply_lora_gpt2_conv1d_matches_peft(tmp_path: Path) -> None:
    model = tiny_gpt2()
    base = copy.deepcopy(model)
    cfg = LoraConfig(r=4, alpha=8, target_modules=["c_attn"])
    assert apply_lora(model, cfg) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    ids = input_ids()
    torch.testing.assert_close(model(ids).logits, base(ids).logits)
    randomize_b(model)
    save_adapter(model, tmp_path, cfg)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    torch.testing.assert_close(theirs(ids).logits, model(ids).logits)


def test_peft_loads_our_adapter(tmp_path: Path) -> None:
    model = tiny_llama()
    base = copy.deepcopy(model)
    cfg = LoraConfig(r=4, alpha=8, dropout=0.1)
    apply_lora(model, cfg)
    randomize_b(model)
    save_adapter(model, tmp_path, cfg, base_model_name_or_path="tiny-llama")
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4 and saved["lora_alpha"] == 8
    assert saved["target_modules"] == sorted(cfg.target_modules)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    ids = input_ids()
    torch.testing.assert_close(theirs(ids).logits, model.eval()(ids).logits)
    # ...and our keys are exactly PEFT's.
    assert set(peft.get_peft_model_state_dict(theirs)) == set(lora_state_dict(model))


def test_modules_to_save_roundtrip_with_peft(tmp_path: Path) -> None:
    model = tiny_llama(cls=LlamaForSequenceClassification, num_labels=1, pad_token_id=0)
    base = copy.deepcopy(model)
    cfg = LoraConfig(r=4, alpha=8, target_modules=r".*\.self_attn\.(q|v)_proj", modules_to_save=["score"])
    assert len(apply_lora(model, cfg)) == 4
    assert model.score.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad
    randomize_b(model)
    with torch.no_grad():
        model.score.weight.normal_()
    assert "base_model.model.score.weight" in lora_state_dict(model)
    save_adapter(model, tmp_path, cfg, task_type="SEQ_CLS")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == cfg.target_modules
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = input_ids()
    torch.testing.assert_close(theirs(ids).logits, model(ids).logits)
    # load_adapter round trip into a fresh model.
    fresh = copy.deepcopy(base)
    apply_lora(fresh, cfg)
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits)
    for k, v in lora_state_dict(model).items():
        torch.testing.assert_close(lora_state_dict(fresh)[k], v)


def test_load_adapter_errors(tmp_path: Path) -> None:
    model = tiny_llama()
    cfg = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    apply_lora(model, cfg)
    save_adapter(model, tmp_path, cfg)
    other = tiny_llama()
    apply_lora(other, LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="unexpected keys"):
        load_adapter(other, tmp_path)
    other = tiny_llama()
    apply_lora(other, LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="shapes"):
        load_adapter(other, tmp_path)
    other = tiny_llama()
    apply_lora(other, LoraConfig(r=4, alpha=32, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="lora_alpha"):
        load_adapter(other, tmp_path)


def test_target_errors() -> None:
    with pytest.raises(ValueError, match=r"matches no module.*'c_attn'"):
        apply_lora(tiny_gpt2(), LoraConfig())  # Llama names on GPT-2: the message lists GPT-2's layers
    with pytest.raises(ValueError, match="not nn.Linear/Conv1D.*LlamaMLP"):
        apply_lora(tiny_llama(), LoraConfig(target_modules=["mlp"]))
    with pytest.raises(ValueError, match="modules_to_save.*'head'"):
        apply_lora(tiny_llama(), LoraConfig(modules_to_save=["head"]))
    model = tiny_llama()
    names = apply_lora(model, LoraConfig(target_modules=r"model\.layers\.1\..*_proj"))
    assert len(names) == 7 and all(n.startswith("model.layers.1.") for n in names)


def test_merge_lora_model_and_merged_state_dict() -> None:
    model = tiny_llama()
    apply_lora(model, LoraConfig(r=4, alpha=8))
    randomize_b(model)
    ids = input_ids()
    logits = model(ids).logits
    merged = merged_state_dict(model)
    assert not any("lora_" in k for k in merged)
    merge_lora(model)
    torch.testing.assert_close(model(ids).logits, logits)
    unmerge_lora(model)
    exported = tiny_llama(seed=5)
    exported.load_state_dict(merged)
    torch.testing.assert_close(exported(ids).logits, logits)
    plain = merge_and_unload(model)
    assert not _loras(plain)
    assert set(plain.state_dict()) == set(merged)
    torch.testing.assert_close(plain(ids).logits, logits)


class Embedded(nn.Module):
    """Frozen embedding -> reentrant-checkpointed LoRA layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(101, 24)
        self.proj = nn.Linear(24, 24)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(self.proj, self.embed(ids), use_reentrant=True)


def test_gradient_checkpointing_needs_prepare() -> None:
    torch.manual_seed(0)
    model = Embedded()
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["proj"]))
    with warnings.catch_warnings():  # "None of the inputs have requires_grad=True"
        warnings.simplefilter("ignore")
        assert not model(input_ids()).requires_grad  # reentrant checkpointing cut the adapters off
    assert prepare_for_gradient_checkpointing(model) is prepare_for_gradient_checkpointing(model)
    model(input_ids()).square().sum().backward()
    assert model.proj.lora_A.grad is not None and model.embed.weight.grad is None


def test_gradient_checkpointing_hf_llama() -> None:
    model = tiny_llama()
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    randomize_b(model)
    model.activation_checkpointing_enable({"use_reentrant": True})
    prepare_for_gradient_checkpointing(model)
    model.train()(input_ids(), labels=input_ids(), use_cache=False).loss.backward()
    assert all(m.lora_A.grad is not None and m.lora_A.grad.abs().sum() > 0 for m in _loras(model))


def test_triton_kernel_path_matches_torch() -> None:
    pytest.importorskip("triton")
    pytest.importorskip("distributed_pt_kernels.lora_matmul")
    torch.manual_seed(0)
    base = nn.Linear(32, 48)
    ours = {k: LoraLinear(copy.deepcopy(base), r=16, alpha=32, kernel=k) for k in ("torch", "triton")}
    ours["triton"].load_state_dict(ours["torch"].state_dict())
    nn.init.normal_(ours["torch"].lora_B)
    ours["triton"].lora_B.data.copy_(ours["torch"].lora_B)
    x = torch.randn(2, 16, 32)
    if torch.cuda.is_available():  # compiled kernels need CUDA tensors; the interpreter runs on CPU
        ours = {k: layer.cuda() for k, layer in ours.items()}
        x = x.cuda()
    outs = {}
    for k, layer in ours.items():
        xk = x.clone().requires_grad_()
        y = layer(xk)
        y.square().sum().backward()
        outs[k] = (y, xk.grad, layer.lora_A.grad, layer.lora_B.grad)
    for a, b in zip(outs["triton"], outs["torch"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


ZERO3_SCRIPT = textwrap.dedent(
    """
    import copy, sys
    import torch, deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM
    from distributed_pt.config import LoraConfig
    from distributed_pt.models.lora import *
    from distributed_pt.models.lora import LoraLinear

    out_dir = sys.argv[1]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**%(llama)r)).eval()
    cfg = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    apply_lora(model, cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.normal_()
    ids = torch.randint(0, 101, (2, 7))
    ref, expect = lora_state_dict(model), model(ids).logits
    merged_ref, counts = merged_state_dict(copy.deepcopy(model)), count_trainable(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    q = engine.module.model.layers[0].self_attn.q_proj
    assert hasattr(q.lora_A, "ds_id") and q.lora_A.numel() == 0 and q.weight.numel() == 0, "not partitioned"
    got = lora_state_dict(engine)
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].shape == ref[k].shape and got[k].numel() > 0, k
        torch.testing.assert_close(got[k], ref[k])
    assert count_trainable(engine) == counts, (count_trainable(engine), counts)
    torch.testing.assert_close(engine(ids).logits, expect)
    merged = merged_state_dict(engine)
    assert merged.keys() == merged_ref.keys()
    for k in merged_ref:
        torch.testing.assert_close(merged[k], merged_ref[k])
    merge_lora(engine)
    torch.testing.assert_close(engine(ids).logits, expect)
    unmerge_lora(engine)
    save_adapter(engine, out_dir, cfg)
    with deepspeed.zero.GatheredParameters([q.lora_B], modifier_rank=0):
        q.lora_B.data.zero_()
    load_adapter(engine, out_dir)
    torch.testing.assert_close(engine(ids).logits, expect)
    assert q.lora_A.numel() == 0, "re-partitioned after gathering"
    torch.distributed.destroy_process_group()
    print("ZERO3_OK")
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_zero3_adapters_gathered(tmp_path: Path) -> None:
    """One-process ZeRO-3 engine (a subprocess, so no process group leaks): gathered adapters, merge, save, load."""
    pytest.importorskip("deepspeed")
    script = tmp_path / "zero3_lora.py"
    script.write_text(ZERO3_SCRIPT % {"llama": LLAMA})
    env = dict(
        os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
        DS_ACCELERATOR="cpu", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "adapter")], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "ZERO3_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(saved) == 8 and all(t.numel() > 0 for t in saved.values())
