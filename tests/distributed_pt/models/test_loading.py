"""Model and tokenizer loading: random init from a config dict, local directories only, checks that name the key."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

from distributed_pt.config import ConfigError, ModelConfig
from distributed_pt.models.loading import attention_implementation, build_config, load_model, load_tokenizer
from tests.conftest import DEMO

TINY = {
    "llama": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
    ),
    "qwen2": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
    ),
    "gpt2": dict(n_embd=32, n_layer=1, n_head=2, n_positions=64),
}


def init(model_type: str, **extra) -> dict:
    return {"model_type": model_type, **TINY[model_type], **extra}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig())


def test_bundled_tokenizer_has_eos_and_pad(tok):
    assert tok.eos_token == "<eos>" and tok.eos_token_id is not None
    assert tok.pad_token == "<pad>" and tok.pad_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.decode(tok("sort : b a =")["input_ids"]) == "sort : b a ="


def copy_tokenizer(tmp_path, drop: str):
    out = tmp_path / f"tok_without_{drop}"
    shutil.copytree(DEMO / "tokenizer", out)
    conf = json.loads((out / "tokenizer_config.json").read_text())
    del conf[drop]
    (out / "tokenizer_config.json").write_text(json.dumps(conf))
    return out


def test_tokenizer_without_pad_pads_with_eos(tmp_path):
    tok = load_tokenizer(ModelConfig(tokenizer=str(copy_tokenizer(tmp_path, "pad_token"))))
    assert tok.pad_token_id == tok.eos_token_id


def test_tokenizer_without_eos_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no EOS token") as e:
        load_tokenizer(ModelConfig(tokenizer=str(copy_tokenizer(tmp_path, "eos_token"))))
    assert "model.tokenizer" in str(e.value)


@pytest.mark.parametrize("key", ["tokenizer", "path"])
def test_missing_tokenizer_directory_names_the_key(tmp_path, key):
    with pytest.raises(ConfigError, match=f"model.{key}: .* is not a local directory"):
        load_tokenizer(ModelConfig(**{key: str(tmp_path / "nope")}))


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2"])
def test_build_from_init_config(tok, model_type):
    model = load_model(ModelConfig(init_config=init(model_type), dtype="fp32"), tok)
    assert model.config.model_type == model_type
    # Vocab and special ids default to the tokenizer's.
    assert model.get_input_embeddings().num_embeddings == len(tok)
    assert model.config.eos_token_id == tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    assert all(p.dtype == torch.float32 for p in model.parameters())
    out = model(input_ids=torch.tensor([tok("sort : b a =")["input_ids"]]))
    assert out.logits.shape[-1] == len(tok)


def test_gpt2_ties_the_lm_head_to_the_embedding(tok):
    model = load_model(ModelConfig(init_config=init("gpt2"), dtype="fp32"), tok)
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_llama_tying_follows_the_config(tok):
    untied = load_model(ModelConfig(init_config=init("llama"), dtype="fp32"), tok)
    assert untied.lm_head.weight is not untied.get_input_embeddings().weight
    tied = load_model(ModelConfig(init_config=init("llama", tie_word_embeddings=True), dtype="fp32"), tok)
    assert tied.lm_head.weight is tied.get_input_embeddings().weight


@pytest.mark.parametrize(("dtype", "torch_dtype"), [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_dtype(tok, dtype, torch_dtype):
    model = load_model(ModelConfig(init_config=init("llama"), dtype=dtype), tok)
    assert {p.dtype for p in model.parameters()} == {torch_dtype}


def test_gradient_checkpointing_switch(tok):
    off = load_model(ModelConfig(init_config=init("llama"), dtype="fp32"), tok)
    assert not off.is_gradient_checkpointing
    on = load_model(ModelConfig(init_config=init("llama"), dtype="fp32", gradient_checkpointing=True), tok)
    assert on.is_gradient_checkpointing and on.config.use_cache is False
    # Still trains: a backward pass through the checkpointed layers works.
    on.train()
    ids = torch.tensor([tok("sort : b a =")["input_ids"]])
    on(input_ids=ids, labels=ids).loss.backward()
    assert on.get_input_embeddings().weight.grad is not None


def test_save_pretrained_and_load_back_with_model_path(tok, tmp_path):
    torch.manual_seed(0)
    model = load_model(ModelConfig(init_config=init("qwen2"), dtype="fp32"), tok)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    cfg = ModelConfig(path=str(tmp_path / "m"), dtype="fp32")
    tok2 = load_tokenizer(cfg)  # tokenizer defaults to model.path
    assert tok2.get_vocab() == tok.get_vocab() and tok2.eos_token_id == tok.eos_token_id
    loaded = load_model(cfg, tok2)
    assert type(loaded) is type(model)
    want = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name])
    # Loaded in the configured dtype.
    assert next(load_model(ModelConfig(path=str(tmp_path / "m"), dtype="bf16"), tok2).parameters()).dtype == (
        torch.bfloat16
    )


def test_sharded_safetensors_with_an_index_load_through_model_path(tok, tmp_path):
    # How real checkpoints ship: model-0000i-of-0000n.safetensors shards and model.safetensors.index.json.
    torch.manual_seed(0)
    model = load_model(ModelConfig(init_config=init("llama", num_hidden_layers=2), dtype="fp32"), tok)
    model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / "m" / s).is_file() for s in shards)
    assert not (tmp_path / "m" / "model.safetensors").exists()
    loaded = load_model(ModelConfig(path=str(tmp_path / "m"), dtype="fp32"), tok)
    want, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name])


def test_non_existent_model_path_names_the_key(tok, tmp_path):
    with pytest.raises(ConfigError, match="model.path: .* is not a local directory"):
        load_model(ModelConfig(path=str(tmp_path / "missing")), tok)


def test_path_and_init_config_are_exclusive(tok, tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        load_model(ModelConfig(path=str(tmp_path), init_config=init("llama")), tok)
    with pytest.raises(ConfigError, match="set 'path'"):
        load_model(ModelConfig(), tok)


def test_vocab_smaller_than_tokenizer_is_an_error(tok):
    with pytest.raises(ConfigError, match=r"vocabulary \(40\) is smaller than the tokenizer's \(85\)"):
        load_model(ModelConfig(init_config=init("llama", vocab_size=40), dtype="fp32"), tok)
    # A larger vocabulary (padded embedding) is fine.
    model = load_model(ModelConfig(init_config=init("llama", vocab_size=128), dtype="fp32"), tok)
    assert model.get_input_embeddings().num_embeddings == 128


def test_init_config_errors(tok):
    with pytest.raises(ConfigError, match="needs 'model_type'"):
        build_config({"hidden_size": 32}, tok)
    with pytest.raises(ConfigError, match="model.init_config"):
        build_config({"model_type": "no_such_model"}, tok)


def test_invalid_architecture_in_init_config_is_a_config_error(tok):
    with pytest.raises(ConfigError, match="model.init_config"):
        build_config({"model_type": "llama", "hidden_size": 30, "num_attention_heads": 4}, tok)


def test_attention_implementation():
    assert attention_implementation(ModelConfig(attn_implementation="eager")) == "eager"
    if not torch.cuda.is_available():
        assert attention_implementation(ModelConfig()) == "sdpa"
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ConfigError, match="flash-attn"):
            attention_implementation(ModelConfig(attn_implementation="flash_attention_2"))


def test_a_tokenizer_other_than_the_models_saved_one_is_warned(tmp_path, capsys):
    demo = load_tokenizer(ModelConfig())
    demo.save_pretrained(tmp_path / "model")  # the model directory's own tokenizer
    small = load_tokenizer(ModelConfig())
    small.add_tokens(["<extra>"])
    small.save_pretrained(tmp_path / "other")
    load_tokenizer(ModelConfig(path=str(tmp_path / "model"), tokenizer=str(tmp_path / "model")))
    assert "warning" not in capsys.readouterr().out
    load_tokenizer(ModelConfig(path=str(tmp_path / "model"), tokenizer=str(tmp_path / "other")))
    out = capsys.readouterr().out
    assert f"model.tokenizer ({tmp_path / 'other'}, {len(small)} tokens) is not the tokenizer saved" in out
    assert f"({tmp_path / 'model'}, {len(demo)} tokens)" in out


def test_tiled_mlp_gives_the_same_loss_and_gradients():
    """model.tiled_mlp: every `.mlp` runs over tiles of the tokens (DeepSpeed's TiledMLP, recomputed in the backward):
    the loss and every gradient equal the plain model's, LoRA adapters included; nothing of the MLP is kept but its
    input."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from distributed_pt.config import LoraConfig
    from distributed_pt.models.loading import make_trainable, tile_mlps

    torch.manual_seed(0)
    plain = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=88, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=61))  # fmt: skip
    make_trainable(plain, LoraConfig(enabled=True, r=4, target_modules=["gate_proj", "up_proj", "down_proj"]), False)
    for p in plain.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)  # LoRA's B starts at 0: make its gradient path non-trivial
    tiled = copy.deepcopy(plain)
    tile_mlps(tiled, 3)
    ids = torch.randint(0, 61, (2, 37))  # 37 tokens: uneven tiles
    grads = []
    for model in (plain, tiled):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-6, atol=0)
    assert len(grads[0][1]) > 0
    for g_tiled, g_plain in zip(grads[1][1], grads[0][1], strict=True):
        torch.testing.assert_close(g_tiled, g_plain, rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match="model.tiled_mlp"):
        tile_mlps(torch.nn.Linear(2, 2), 2)


def test_offloaded_activations_give_the_same_loss_and_gradients():
    """model.offload_activations: the body's saved tensors (with checkpointing, each layer's input) go through host
    memory; the step is unchanged. Without gradient checkpointing it is refused, naming the key."""
    import copy
    import dataclasses

    from distributed_pt.models.loading import offload_activations

    cfg = ModelConfig(init_config={"model_type": "llama", **TINY["llama"], "num_hidden_layers": 2}, dtype="fp32",
                      gradient_checkpointing=True)  # fmt: skip
    torch.manual_seed(0)
    plain = load_model(cfg, load_tokenizer(cfg)).train()
    offloaded = copy.deepcopy(plain)
    offload_activations(offloaded)
    ids = torch.randint(3, 60, (2, 19))
    out = []
    for model in (plain, offloaded):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=0, atol=0)
    for a, b in zip(out[1][1], out[0][1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="model.offload_activations"):
        load_model(
            dataclasses.replace(cfg, gradient_checkpointing=False, offload_activations=True), load_tokenizer(cfg)
        )
