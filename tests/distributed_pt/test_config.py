"""Stage configs: YAML < CLI precedence, typed sections, errors naming the key and its source, save/load round trip."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from distributed_pt.config import (
    ConfigError,
    ModelConfig,
    OptimConfig,
    SFTConfig,
    load_config,
    save_config,
    to_dict,
)
from tests.conftest import ROOT


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def base(tmp_path) -> Path:
    return write(
        tmp_path,
        """
        stage: sft
        output_dir: out/yaml
        model:
          init_config: {model_type: llama, hidden_size: 64}
          dtype: fp32
        optim:
          lr: 2.0e-3
          warmup_steps: 5
        train:
          micro_batch_size: 4
        logging:
          tags: [a, b]
        """,
    )


def test_yaml_values_fill_typed_sections_and_defaults_stay(base):
    cfg = load_config(base)
    assert isinstance(cfg, SFTConfig)
    assert isinstance(cfg.model, ModelConfig) and isinstance(cfg.optim, OptimConfig)
    assert cfg.output_dir == "out/yaml"
    assert cfg.model.init_config == {"model_type": "llama", "hidden_size": 64}
    assert cfg.model.dtype == "fp32"
    assert cfg.optim.lr == 2e-3 and cfg.optim.warmup_steps == 5
    assert cfg.train.micro_batch_size == 4
    assert cfg.logging.tags == ["a", "b"]
    # Untouched keys keep the dataclass defaults.
    assert cfg.optim.weight_decay == OptimConfig().weight_decay
    assert cfg.train.gradient_accumulation_steps == 1
    assert cfg.model.path is None


def test_cli_overrides_win_over_yaml(base):
    cfg = load_config(base, ["optim.lr=5e-4", "output_dir=out/cli", "train.micro_batch_size=2", "model.dtype=bf16"])
    assert cfg.optim.lr == 5e-4
    assert cfg.output_dir == "out/cli"
    assert cfg.train.micro_batch_size == 2
    assert cfg.model.dtype == "bf16"
    # Applied left to right: the last override of a key wins.
    assert load_config(base, ["optim.lr=1e-3", "optim.lr=3e-3"]).optim.lr == 3e-3


def test_the_bundled_config_loads():
    cfg = load_config(ROOT / "configs" / "sft_tiny.yaml")
    assert cfg.stage == "sft"
    assert cfg.model.init_config["model_type"] == "llama"
    assert cfg.data.train_files


def test_unknown_key_in_yaml_names_the_key_and_the_file(tmp_path):
    path = write(tmp_path, "stage: sft\noptim:\n  learning_rate: 1.0e-3\n", name="typo.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "optim.learning_rate" in str(e.value)
    assert str(path) in str(e.value)


def test_unknown_top_level_section_in_yaml(tmp_path):
    path = write(tmp_path, "stage: sft\noptimizer: {lr: 1}\n")
    with pytest.raises(ConfigError, match="unknown key 'optimizer'"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.learning_rate=1e-3", "optim.learning_rate"),
        ("optimizer.lr=1e-3", "optimizer"),
        ("model.init_config_x=1", "model.init_config_x"),
        ("bogus=1", "bogus"),
    ],
)
def test_unknown_key_on_the_cli(base, override, key):
    with pytest.raises(ConfigError) as e:
        load_config(base, [override])
    assert "command line" in str(e.value)
    assert f"unknown key '{key}'" in str(e.value)


def test_override_without_equals_sign(base):
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(base, ["optim.lr"])


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("train:\n  micro_batch_size: eight\n", "train.micro_batch_size"),  # string for int
        ("train:\n  micro_batch_size: true\n", "train.micro_batch_size"),  # bool is not an int
        ("train:\n  max_steps: 1.5\n", "train.max_steps"),  # float is not an int
        ("model:\n  dtype: bf32\n", "model.dtype"),  # not one of the literal values
        ("optim:\n  scheduler: step\n", "optim.scheduler"),
        ("optim:\n  lr: fast\n", "optim.lr"),  # not a number
        ("optim:\n  lr: true\n", "optim.lr"),  # bool is not a float
        ("lora:\n  enabled: 1\n", "lora.enabled"),  # int is not a bool
        ("optim:\n  betas: [0.9]\n", "optim.betas"),  # wrong tuple length
        ("data:\n  train_files: a.jsonl\n", "data.train_files"),  # a string is not a list
        ("data:\n  train_files: [1]\n", "data.train_files[0]"),
        ("model:\n  init_config: [1, 2]\n", "model.init_config"),
        ("optim: 3\n", "optim"),  # a section must be a mapping
    ],
)
def test_type_errors_in_yaml_name_the_key_and_file(tmp_path, yaml_text, key):
    path = write(tmp_path, "stage: sft\n" + yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert f"'{key}'" in str(e.value)
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.micro_batch_size=eight", "train.micro_batch_size"),
        ("train.micro_batch_size=true", "train.micro_batch_size"),
        ("train.global_batch_size=false", "train.global_batch_size"),
        ("model.dtype=bf32", "model.dtype"),
        ("optim.lr=fast", "optim.lr"),
        ("optim.betas=[0.9,0.9,0.9]", "optim.betas"),
    ],
)
def test_type_errors_on_the_cli_name_the_key(base, override, key):
    with pytest.raises(ConfigError) as e:
        load_config(base, [override])
    assert f"'{key}'" in str(e.value)
    assert "command line" in str(e.value)


def test_floats_from_ints_and_exponent_strings(tmp_path):
    # YAML 1.1 reads 1e-4 (no dot) as a string and 1 as an int: both become floats.
    path = write(tmp_path, "stage: sft\noptim:\n  lr: 1e-4\n  grad_clip: 2\n  min_lr_ratio: 0\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 1e-4 and type(cfg.optim.lr) is float
    assert cfg.optim.grad_clip == 2.0 and type(cfg.optim.grad_clip) is float
    assert cfg.optim.min_lr_ratio == 0.0 and type(cfg.optim.min_lr_ratio) is float
    cfg = load_config(path, ["optim.lr=3", "optim.eps=1e-6"])
    assert cfg.optim.lr == 3.0 and type(cfg.optim.lr) is float
    assert cfg.optim.eps == 1e-6 and type(cfg.optim.eps) is float


def test_betas_become_a_tuple_of_floats(tmp_path):
    path = write(tmp_path, "stage: sft\noptim:\n  betas: [0.8, 1]\n")
    assert load_config(path).optim.betas == (0.8, 1.0)
    assert type(load_config(path).optim.betas[1]) is float
    assert load_config(path, ["optim.betas=[0.5, 0.6]"]).optim.betas == (0.5, 0.6)


def test_list_overrides_replace_the_list(base):
    cfg = load_config(base, ["logging.tags=[x]", "data.train_files=[a.jsonl, b.jsonl]"])
    assert cfg.logging.tags == ["x"]
    assert cfg.data.train_files == ["a.jsonl", "b.jsonl"]
    assert load_config(base, ["logging.tags=[]"]).logging.tags == []


def test_union_of_list_or_string(base):
    assert load_config(base, ["lora.target_modules=.*proj"]).lora.target_modules == ".*proj"
    assert load_config(base, ["lora.target_modules=[q_proj]"]).lora.target_modules == ["q_proj"]


def test_optional_fields_accept_null(base):
    cfg = load_config(base, ["train.global_batch_size=16"])
    assert cfg.train.global_batch_size == 16
    assert load_config(base, ["train.global_batch_size=null"]).train.global_batch_size is None


def test_bool_literals_spelled_true_false(base):
    # loss.fused is a literal "auto" | "true" | "false"; YAML parses true/false as bools.
    assert load_config(base, ["loss.fused=false"]).loss.fused == "false"
    assert load_config(base, ["loss.fused=true"]).loss.fused == "true"


def test_dict_field_overrides_update_and_create_keys(base):
    cfg = load_config(base, ["model.init_config.hidden_size=32", "model.init_config.num_hidden_layers=3"])
    assert cfg.model.init_config == {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 3}
    # A dict field that is None: the override creates it.
    cfg = load_config(base, ["model.init_config=null", "model.init_config.model_type=gpt2"])
    assert cfg.model.init_config == {"model_type": "gpt2"}
    # A whole mapping at once.
    cfg = load_config(base, ["model.init_config={model_type: qwen2, hidden_size: 16}"])
    assert cfg.model.init_config == {"model_type": "qwen2", "hidden_size": 16}


def test_whole_section_override(base):
    cfg = load_config(base, ["optim={lr: 1, warmup_steps: 2}"])
    assert cfg.optim.lr == 1.0 and cfg.optim.warmup_steps == 2
    with pytest.raises(ConfigError, match="'optim.bogus'"):
        load_config(base, ["optim={bogus: 1}"])


def test_override_through_a_non_dict_optional_field_is_an_error(base):
    with pytest.raises(ConfigError, match="model.path"):
        load_config(base, ["model.path.x=1"])


def test_override_through_a_scalar_field_is_a_config_error(base):
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(base, ["optim.lr.x=1"])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_bad_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "stage: sft\noptim: {lr: [1, 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "not valid YAML" in str(e.value) and str(path) in str(e.value)


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize("text", ["stage: ppo_typo\n", "output_dir: x\n", ""])
def test_wrong_or_missing_stage(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="'stage' must be one of"):
        load_config(path)


def test_stage_from_the_command_line(tmp_path):
    path = write(tmp_path, "output_dir: x\n")
    assert load_config(path, ["stage=sft"]).stage == "sft"
    with pytest.raises(ConfigError, match="'stage'"):
        load_config(write(tmp_path, "stage: sft\n", "b.yaml"), ["stage=nope"])


def test_save_config_round_trip(base, tmp_path):
    cfg = load_config(
        base,
        [
            "optim.betas=[0.8, 0.99]",
            "loss.fused=false",
            "train.global_batch_size=8",
            "lora.target_modules=.*proj",
            "checkpoint.resume=none",
            "logging.entity=me",
        ],
    )
    out = tmp_path / "saved" / "config.yaml"
    out.parent.mkdir()
    save_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)
    assert isinstance(again.optim.betas, tuple)


def test_round_trip_of_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "stage: sft\n"))
    assert cfg == SFTConfig()
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_to_dict_is_plain_data(base):
    d = to_dict(load_config(base))
    assert d["optim"]["lr"] == 2e-3
    assert d["model"]["init_config"]["model_type"] == "llama"
    assert set(d) == {f.name for f in dataclasses.fields(SFTConfig)}


def test_help_lists_every_stage_with_an_example():
    import subprocess
    import sys

    from distributed_pt.config import STAGES

    out = subprocess.run([sys.executable, "-m", "distributed_pt.train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name, stage in STAGES.items():
        assert f"  {name} " in out.stdout and stage.example in out.stdout
