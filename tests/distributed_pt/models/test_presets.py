"""Architecture presets: every preset builds on the meta device at its documented size, a preset checks a checkpoint's
config.json, random init from a preset, and trust_remote_code. Real presets are only ever built on the meta device
(an 8B model in fp32 would take 32 GB); loading end to end uses tiny presets written to a temporary PRESET_DIR."""

from __future__ import annotations

import json
import re
import textwrap

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from distributed_pt.config import ConfigError, ModelConfig, load_config
from distributed_pt.models import presets
from distributed_pt.models.loading import init_model_config, load_model, load_tokenizer
from distributed_pt.models.presets import (
    build_meta_model,
    check_preset_matches,
    count_parameters,
    hf_config,
    load_preset,
    preset_names,
    preset_parameters,
)
from distributed_pt.models.reward import load_reward_model
from tests.conftest import ROOT

# The public parameter count of each preset's model, as its model page rounds it: (figure, unit).
PUBLIC = {
    "llama-3.1-8b": ("8.03", 1e9),
    "llama-3.1-70b": ("70.55", 1e9),
    "llama-3.2-1b": ("1.24", 1e9),
    "qwen2.5-7b": ("7.62", 1e9),
    "qwen2.5-0.5b": ("0.49", 1e9),
    "mistral-7b-v0.3": ("7.25", 1e9),
    "gpt2": ("124", 1e6),
}
TIED = {"llama-3.2-1b", "qwen2.5-0.5b", "gpt2"}
GQA = {"llama-3.1-8b": (32, 8), "llama-3.1-70b": (64, 8), "llama-3.2-1b": (32, 8), "qwen2.5-7b": (28, 4)}
GQA |= {"qwen2.5-0.5b": (14, 2), "mistral-7b-v0.3": (32, 8)}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig())


def test_every_preset_has_a_public_figure():
    assert set(preset_names()) == set(PUBLIC)


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_preset_builds_on_meta_with_its_documented_parameter_count(name):
    model = build_meta_model(load_preset(name))
    assert all(p.is_meta for p in model.parameters())  # shapes only: nothing allocated
    n = count_parameters(model)
    assert n == preset_parameters(name)
    figure, unit = PUBLIC[name]
    decimals = len(figure.partition(".")[2])
    assert f"{n / unit:.{decimals}f}" == figure
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (name in TIED)


@pytest.mark.parametrize("name", sorted(GQA))
def test_grouped_query_attention(name):
    preset = load_preset(name)
    heads, kv_heads = GQA[name]
    assert (preset["num_attention_heads"], preset["num_key_value_heads"]) == (heads, kv_heads)
    attn = build_meta_model(preset).model.layers[0].self_attn
    head_dim = attn.q_proj.out_features // heads
    assert attn.k_proj.out_features == attn.v_proj.out_features == kv_heads * head_dim


@pytest.mark.parametrize(("name", "factor"), [("llama-3.1-8b", 8.0), ("llama-3.1-70b", 8.0), ("llama-3.2-1b", 32.0)])
def test_llama3_rope_scaling(name, factor):
    preset = load_preset(name)
    assert preset["rope_scaling"] == {
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    }
    assert preset["rope_theta"] == 500000.0 and preset["max_position_embeddings"] == 131072
    rope = hf_config(preset).to_dict().get("rope_parameters") or hf_config(preset).rope_scaling
    assert rope["rope_type"] == "llama3" and rope["factor"] == factor


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_preset_files_are_config_json_with_a_header(name):
    text = (presets.PRESET_DIR / f"{name}.yaml").read_text()
    # The header names the source model and its documented size.
    first = text.splitlines()[0]
    assert re.match(r"# .+\((meta-llama|Qwen|mistralai|openai-community)/[\w.-]+", first), first
    assert PUBLIC[name][0] in first or f"{PUBLIC[name][0]}M" in first
    preset = load_preset(name)
    assert "parameters" not in preset and isinstance(yaml.safe_load(text)["parameters"], int)
    # YAML 1.1 reads 1e-05 as a string: every number must come back a number.
    words = {"model_type", "hidden_act", "activation_function", "torch_dtype", "summary_type"}
    assert all(not isinstance(v, str) for k, v in preset.items() if k not in words), preset
    assert isinstance(preset["vocab_size"], int) and preset["vocab_size"] > 0


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"model.preset: unknown preset 'llama-9b'; known presets: .*llama-3.1-8b"):
        load_preset("llama-9b")
    with pytest.raises(ConfigError, match="unknown preset"):
        preset_parameters("llama-9b")


def write_config_json(path, fields: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(fields))


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_preset_matches_its_config_json(tmp_path, name):
    # As published on the Hub (transformers 4 spelling: rope_theta, rope_scaling) ...
    write_config_json(tmp_path / "hub", load_preset(name))
    check_preset_matches(name, tmp_path / "hub")
    # ... and as transformers 5 saves it (rope_parameters).
    hf_config(load_preset(name)).save_pretrained(tmp_path / "saved")
    check_preset_matches(name, tmp_path / "saved")


def test_instruct_context_length_and_token_ids_are_not_architecture(tmp_path):
    # Qwen2.5-7B-Instruct: 32768 positions and its own EOS, same weights' shapes as the base model.
    write_config_json(tmp_path, {**load_preset("qwen2.5-7b"), "max_position_embeddings": 32768, "eos_token_id": 151645})
    check_preset_matches("qwen2.5-7b", tmp_path)


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("num_hidden_layers", 16, "num_hidden_layers 32 (preset) vs 16 (config.json)"),
        ("num_key_value_heads", 32, "num_key_value_heads 8 (preset) vs 32 (config.json)"),
        ("tie_word_embeddings", True, "tie_word_embeddings False (preset) vs True (config.json)"),
        ("vocab_size", 128000, "vocab_size 128256 (preset) vs 128000 (config.json)"),
        ("rope_theta", 10000.0, "rope_"),
        ("model_type", "mistral", "model_type 'llama' (preset) vs 'mistral' (config.json)"),
    ],
)
def test_changed_key_fails_naming_it(tmp_path, key, value, named):
    write_config_json(tmp_path, {**load_preset("llama-3.1-8b"), key: value})
    with pytest.raises(ConfigError) as e:
        check_preset_matches("llama-3.1-8b", tmp_path)
    msg = str(e.value)
    assert named in msg
    assert str(presets.PRESET_DIR / "llama-3.1-8b.yaml") in msg and str(tmp_path / "config.json") in msg


def test_changed_rope_scaling_fails(tmp_path):
    preset = load_preset("llama-3.1-8b")
    write_config_json(tmp_path, {**preset, "rope_scaling": {**preset["rope_scaling"], "factor": 32.0}})
    changed = r"rope_(scaling|parameters) .*'factor': 8\.0.* \(preset\) vs .*'factor': 32\.0"
    with pytest.raises(ConfigError, match=changed):
        check_preset_matches("llama-3.1-8b", tmp_path)


def test_path_without_config_json(tmp_path):
    with pytest.raises(ConfigError, match="has no config.json"):
        check_preset_matches("gpt2", tmp_path)


def test_real_preset_random_init_config_keeps_its_vocab_and_takes_the_tokenizers_ids(tok):
    config = init_model_config(ModelConfig(preset="llama-3.1-8b"), tok)
    assert config.vocab_size == 128256 > len(tok)
    assert (config.eos_token_id, config.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    with torch.device("meta"):
        assert count_parameters(AutoModelForCausalLM.from_config(config)) == preset_parameters("llama-3.1-8b")


# Tiny presets in a temporary PRESET_DIR, for loading end to end on CPU.
TINY = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_type": "llama3",
    },
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "bos_token_id": 1000,
    "eos_token_id": 1001,
}


@pytest.fixture
def tiny_presets(tmp_path, monkeypatch):
    d = tmp_path / "models"
    d.mkdir()
    for name, vocab in (("tiny-llama", 128), ("tiny-small-vocab", 40)):
        fields = {**TINY, "vocab_size": vocab}
        fields["parameters"] = count_parameters(build_meta_model(fields))
        (d / f"{name}.yaml").write_text(f"# A tiny Llama (test/{name}): 0 parameters documented.\n" + yaml.dump(fields))
    monkeypatch.setattr(presets, "PRESET_DIR", d)
    return d


def test_preset_without_path_builds_a_random_init_model(tok, tiny_presets):
    assert preset_names() == ["tiny-llama", "tiny-small-vocab"]
    model = load_model(ModelConfig(preset="tiny-llama", dtype="fp32"), tok)
    assert model.config.num_key_value_heads == 2 and model.config.num_hidden_layers == 2
    assert model.get_input_embeddings().num_embeddings == 128  # the preset's vocabulary: larger than the tokenizer's
    assert count_parameters(model) == preset_parameters("tiny-llama")
    assert (model.config.eos_token_id, model.config.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    out = model(input_ids=torch.tensor([tok("sort : b a =")["input_ids"]]))
    assert out.logits.shape[-1] == 128
    # A preset vocabulary smaller than the tokenizer's grows to fit it.
    small = load_model(ModelConfig(preset="tiny-small-vocab", dtype="fp32"), tok)
    assert small.get_input_embeddings().num_embeddings == len(tok)
    # The reward model / critic path builds from a preset too.
    rm = load_reward_model(ModelConfig(preset="tiny-llama", dtype="fp32"), tok)
    assert rm.score.out_features == 1 and rm.config.num_hidden_layers == 2


def test_preset_with_a_sharded_path_checks_config_json_and_loads_the_weights(tok, tiny_presets, tmp_path):
    torch.manual_seed(0)
    model = load_model(ModelConfig(preset="tiny-llama", dtype="fp32"), tok)
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "ckpt").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
    loaded = load_model(ModelConfig(path=str(tmp_path / "ckpt"), preset="tiny-llama", dtype="fp32"), tok)
    want, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name])
    # The other preset differs in vocab_size: refused before any weight is read.
    with pytest.raises(ConfigError, match=r"vocab_size 40 \(preset\) vs 128 \(config.json\)"):
        load_model(ModelConfig(path=str(tmp_path / "ckpt"), preset="tiny-small-vocab", dtype="fp32"), tok)


def test_preset_and_init_config_are_exclusive(tok, tiny_presets):
    with pytest.raises(ConfigError, match="'preset' .* or 'init_config' .* not both"):
        load_model(ModelConfig(preset="tiny-llama", init_config={"model_type": "llama"}), tok)
    with pytest.raises(ConfigError, match="model: set 'path' .*, 'preset' .* or 'init_config'"):
        load_model(ModelConfig(), tok)
    with pytest.raises(ConfigError, match="unknown preset 'llama-3.1-8b'; known presets: tiny-llama"):
        load_model(ModelConfig(preset="llama-3.1-8b"), tok)


@pytest.fixture
def remote_code_model(tmp_path, monkeypatch):
    """A model directory whose config.json maps to modelling code shipped in the directory (auto_map)."""
    import transformers.dynamic_module_utils as dynamic
    from transformers import LlamaConfig, LlamaForCausalLM

    # transformers copies the remote code into HF_MODULES_CACHE and puts it on sys.path: keep both in this test.
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    d = tmp_path / "remote"
    d.mkdir()
    (d / "configuration_marked.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass MarkedConfig(LlamaConfig):\n    model_type = 'marked_llama'\n"
    )
    (d / "modeling_marked.py").write_text(
        textwrap.dedent(
            """
            from transformers import LlamaForCausalLM

            from .configuration_marked import MarkedConfig


            class MarkedForCausalLM(LlamaForCausalLM):
                config_class = MarkedConfig

                def __init__(self, config):
                    super().__init__(config)
                    self.remote_code_ran = True
            """
        )
    )
    tiny = {k: v for k, v in TINY.items() if k not in ("model_type", "bos_token_id", "eos_token_id")}
    LlamaForCausalLM(LlamaConfig(**tiny, vocab_size=128)).save_pretrained(d)
    config = json.loads((d / "config.json").read_text())
    config |= {"model_type": "marked_llama", "architectures": ["MarkedForCausalLM"]}
    config["auto_map"] = {
        "AutoConfig": "configuration_marked.MarkedConfig",
        "AutoModelForCausalLM": "modeling_marked.MarkedForCausalLM",
    }
    (d / "config.json").write_text(json.dumps(config))
    return d


def test_trust_remote_code_is_off_unless_set_and_warns_when_on(tok, remote_code_model, capsys):
    assert ModelConfig().trust_remote_code is False
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(ModelConfig(path=str(remote_code_model), dtype="fp32"), tok)
    assert "trust_remote_code" not in capsys.readouterr().out
    model = load_model(ModelConfig(path=str(remote_code_model), dtype="fp32", trust_remote_code=True), tok)
    assert type(model).__name__ == "MarkedForCausalLM" and model.remote_code_ran
    out = capsys.readouterr().out
    assert "warning: model.trust_remote_code is on" in out and str(remote_code_model) in out
    assert "will run" in out


def test_trust_remote_code_warns_for_the_tokenizer(capsys):
    load_tokenizer(ModelConfig(trust_remote_code=True))
    assert "warning: model.trust_remote_code is on: Python code from the tokenizer directory" in capsys.readouterr().out
    load_tokenizer(ModelConfig())
    assert "trust_remote_code" not in capsys.readouterr().out


def test_preset_and_trust_remote_code_are_config_keys(tmp_path):
    cfg = load_config(ROOT / "configs/sft_tiny.yaml", ["model.init_config=null", "model.preset=llama-3.1-8b"])
    assert (cfg.model.preset, cfg.model.init_config, cfg.model.trust_remote_code) == ("llama-3.1-8b", None, False)
    (tmp_path / "c.yaml").write_text("stage: sft\nmodel:\n  preset: qwen2.5-7b\n  trust_remote_code: true\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.model.preset, cfg.model.trust_remote_code) == ("qwen2.5-7b", True)
    with pytest.raises(ConfigError, match="'model.trust_remote_code' expects bool"):
        load_config(tmp_path / "c.yaml", ["model.trust_remote_code=maybe"])
