"""Checkpoints: which one a run resumes from, the atomic `latest`, pruning, exact and pickle-free resume, and the
gathered state dict."""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from distributed_pt import checkpoint
from distributed_pt.checkpoint import LATEST, CheckpointError, find_resume, gathered_state_dict, resume_point


def make_step(root: Path, step: int) -> Path:
    path = root / f"step_{step}"
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"x")
    return path


class FakeEngine:
    """Writes a step directory the way `engine.save_checkpoint` would; can crash halfway through."""

    def __init__(self, crash: bool = False):
        self.crash = crash
        self.calls = []

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        self.calls.append((save_dir, tag, save_latest))
        path = Path(save_dir) / tag
        path.mkdir(parents=True, exist_ok=True)
        (path / "client_state.json").write_text(json.dumps(client_state))
        if self.crash:
            raise RuntimeError("killed mid-save")


class LoadingEngine(FakeEngine):
    def load_checkpoint(self, load_dir, tag):
        return str(Path(load_dir) / tag), json.loads((Path(load_dir) / tag / "client_state.json").read_text())


class TorchLoadingEngine(FakeEngine):
    """Loads its state file the way DeepSpeed 0.19 does: `torch.load(..., weights_only=False)`."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        torch.save(
            {"module": {"w": torch.ones(2)}, **client_state}, Path(save_dir) / tag / "mp_rank_00_model_states.pt"
        )

    def load_checkpoint(self, load_dir, tag):
        state = torch.load(Path(load_dir) / tag / "mp_rank_00_model_states.pt", weights_only=False)
        return str(Path(load_dir) / tag), {k: v for k, v in state.items() if k != "module"}


class Payload:
    """Unpickling this creates `marker`: it stands in for arbitrary code in a tampered checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_payload(path: Path, marker: Path, writer: str) -> None:
    if writer == "torch.save":  # a zip archive, like every file torch.save writes
        torch.save({"python": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_the_payload_is_live(tmp_path, writer):
    # The control for the tests below: loaded the old way, the payload runs.
    write_payload(tmp_path / "p.pt", tmp_path / "marker", writer)
    try:
        torch.load(tmp_path / "p.pt", weights_only=False)
    except RuntimeError:  # a bare pickle runs as torch reads it for a legacy magic number, then torch gives up
        assert writer == "pickle"
    assert (tmp_path / "marker").exists()


# --- find_resume / resume_point --------------------------------------------------------------------------------------


def saved(tmp_path: Path, *steps: int) -> Path:
    """Complete checkpoints (with manifests) of `steps`, as `save` writes them; returns the checkpoints root."""
    for step in steps:
        checkpoint.save(FakeEngine(), str(tmp_path), step, {"step": step}, keep_last=0)
    return tmp_path / "checkpoints"


def test_auto_without_checkpoints(tmp_path):
    assert resume_point(str(tmp_path), "auto") is None
    (tmp_path / "checkpoints").mkdir()
    assert resume_point(str(tmp_path), "auto") is None


def test_auto_with_latest(tmp_path):
    root = saved(tmp_path, 10, 20)
    (root / LATEST).write_text("step_10\n")
    assert find_resume(str(tmp_path), "auto") == (root, ["step_10", "step_20"], False)
    assert resume_point(str(tmp_path), "auto") == (root, "step_10")


def test_half_written_steps_are_removed_and_the_latest_complete_one_resumes(tmp_path, capsys):
    # A crash mid-save leaves a newer step directory without a manifest; `latest` still names the complete one.
    root = saved(tmp_path, 10)
    make_step(root, 20)
    assert resume_point(str(tmp_path), "auto") == (root, "step_10")
    assert not (root / "step_20").exists() and "never finished" in capsys.readouterr().out
    # A first save that crashed: a step directory and no `latest` at all → start fresh, the leftover removed.
    other = tmp_path / "other"
    make_step(other / "checkpoints", 5)
    assert resume_point(str(other), "auto") is None
    assert not (other / "checkpoints" / "step_5").exists()


@pytest.mark.parametrize(
    "damage, says",
    [
        ("truncate", "bytes, "),
        ("empty", "0 bytes"),
        ("delete", "missing"),
        ("rng", "rng_rank0.safetensors: missing"),
        ("flip", "checksum"),
        ("latest_missing_step", "step_30: missing"),
        ("manifest", "no manifest.json"),
    ],
)
def test_a_damaged_latest_falls_back_to_the_previous_complete_one(tmp_path, capsys, damage, says):
    root = saved(tmp_path, 10, 20)
    step = root / "step_20"
    state = step / "client_state.json"
    if damage == "truncate":
        state.write_text(state.read_text()[:-3])
    elif damage == "empty":
        state.write_text("")
    elif damage == "delete":
        state.unlink()
    elif damage == "rng":
        (step / "rng_rank0.safetensors").unlink()
    elif damage == "flip":
        state.write_text(state.read_text().replace("20", "21"))
    elif damage == "latest_missing_step":
        (root / LATEST).write_text("step_30")
    else:
        (step / "manifest.json").unlink()
    expected = "step_20" if damage == "latest_missing_step" else "step_10"  # step_20 is whole there
    assert resume_point(str(tmp_path), "auto") == (root, expected)
    out = capsys.readouterr().out
    assert says in out and expected in out, out
    assert (root / LATEST).read_text() == expected
    if damage != "latest_missing_step":  # the damaged one is kept aside, nothing deleted
        assert (root / "damaged_step_20" / "client_state.json").exists() or damage == "delete"
        assert not step.exists()


def test_no_complete_checkpoint_left_names_the_damage_and_the_way_out(tmp_path):
    root = saved(tmp_path, 10)
    (root / "step_10" / "client_state.json").write_text("")
    with pytest.raises(CheckpointError, match=r"client_state.json: 0 bytes.*checkpoint.resume=none"):
        resume_point(str(tmp_path), "auto")
    assert (root / "step_10").is_dir()  # left as it was, for the user to look at


def test_none_never_resumes(tmp_path):
    saved(tmp_path, 10)
    assert resume_point(str(tmp_path), "none") is None


def test_explicit_checkpoints_dir_and_step_dir(tmp_path):
    root = saved(tmp_path / "run", 30, 40)
    assert resume_point("unused", str(root)) == (root, "step_40")
    assert resume_point("unused", str(root / "step_30")) == (root, "step_30")
    (root / "step_30" / "client_state.json").write_text("")
    with pytest.raises(CheckpointError, match="0 bytes"):  # named explicitly: no fallback
        resume_point("unused", str(root / "step_30"))


def test_explicit_step_without_manifest_loads_unverified(tmp_path, capsys):
    step = make_step(tmp_path / "checkpoints", 7)
    assert resume_point("unused", str(step)) == (step.parent, "step_7")
    assert "unverified" in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["does/not/exist", "step_3_missing"])
def test_bad_explicit_path(tmp_path, bad):
    with pytest.raises(FileNotFoundError, match="checkpoint.resume"):
        find_resume(str(tmp_path), str(tmp_path / bad))


def test_explicit_dir_that_is_neither(tmp_path):
    (tmp_path / "somewhere").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a checkpoints directory nor a step_<N> directory"):
        find_resume(str(tmp_path), str(tmp_path / "somewhere"))


# --- save: the atomic `latest` and pruning ---------------------------------------------------------------------------


def test_save_moves_latest_after_writing(tmp_path):
    engine = FakeEngine()
    path = checkpoint.save(engine, str(tmp_path), 5, {"step": 5}, keep_last=2)
    root = tmp_path / "checkpoints"
    assert path == root / "step_5"
    assert engine.calls == [(str(root), "step_5", False)]  # DeepSpeed's own `latest` is not used
    assert (root / LATEST).read_text() == "step_5"
    assert (path / "rng_rank0.safetensors").is_file()
    assert not (path / "rng_rank0.pt").exists()
    assert not list(root.glob(".*tmp"))  # the temporary file was renamed into place
    assert resume_point(str(tmp_path), "auto") == (root, "step_5")
    manifest = json.loads((path / "manifest.json").read_text())["files"]
    assert set(manifest) == {"client_state.json", "rng_rank0.safetensors"}
    assert all("sha256" in e and e["size"] > 0 for e in manifest.values())


def test_crash_mid_save_keeps_the_previous_latest(tmp_path):
    checkpoint.save(FakeEngine(), str(tmp_path), 5, {"step": 5}, keep_last=2)
    with pytest.raises(CheckpointError, match=r"saving .*step_10 failed: RuntimeError: killed mid-save.*step_5 stays"):
        checkpoint.save(FakeEngine(crash=True), str(tmp_path), 10, {"step": 10}, keep_last=2)
    root = tmp_path / "checkpoints"
    assert (root / "step_10").is_dir()  # partially written
    assert resume_point(str(tmp_path), "auto") == (root, "step_5")


@pytest.mark.parametrize("keep_last", [1, 2, 3])
def test_keep_last_prunes_the_oldest(tmp_path, keep_last):
    for step in (1, 2, 3, 10):  # numeric order: step_10 is the newest (not lexical)
        checkpoint.save(FakeEngine(), str(tmp_path), step, {"step": step}, keep_last=keep_last)
    root = tmp_path / "checkpoints"
    kept = sorted(int(p.name.split("_")[1]) for p in root.glob("step_*"))
    assert kept == [1, 2, 3, 10][-keep_last:]
    assert (root / LATEST).read_text() == "step_10"


def test_load_restores_rng_and_returns_client_state(tmp_path):
    torch.manual_seed(0)
    checkpoint.save(LoadingEngine(), str(tmp_path), 7, {"step": 7, "micro_step": 14}, keep_last=2)
    expected = torch.rand(3)
    torch.manual_seed(123)
    root, tag = resume_point(str(tmp_path), "auto")
    assert checkpoint.load(LoadingEngine(), root, tag) == {"step": 7, "micro_step": 14}
    torch.testing.assert_close(torch.rand(3), expected)


def draws() -> tuple:
    return (
        [random.random() for _ in range(3)] + [random.gauss(0, 1) for _ in range(3)],
        np.concatenate([np.random.rand(3), np.random.randn(3), np.random.randint(0, 2**31, 3)]),
        torch.cat([torch.rand(3), torch.randn(3), torch.randint(0, 2**31, (3,))]),
    )


@pytest.mark.parametrize("engine", [LoadingEngine, TorchLoadingEngine])
def test_rng_round_trips_exactly(tmp_path, engine):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached second gaussian in python's state (gauss_next)
    np.random.randn()  # and in numpy's (has_gauss, cached_gaussian)
    client = {"step": 3, "micro_step": 6, "inputs": {"data": "ab12"}, "kl_ctl": {"value": 0.1, "target": 6.0}}
    checkpoint.save(engine(), str(tmp_path), 3, client, keep_last=1)
    expected = draws()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert checkpoint.load(engine(), *resume_point(str(tmp_path), "auto")) == client
    got = draws()
    assert got[0] == expected[0]
    np.testing.assert_array_equal(got[1], expected[1])
    assert torch.equal(got[2], expected[2])


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_pickle_in_place_of_the_rng_file_is_refused_unrun(tmp_path, writer):
    checkpoint.save(LoadingEngine(), str(tmp_path), 1, {"step": 1}, keep_last=1)
    rng_file = tmp_path / "checkpoints" / "step_1" / "rng_rank0.safetensors"
    write_payload(rng_file, tmp_path / "marker", writer)
    with pytest.raises(CheckpointError, match="rng_rank0.safetensors: not a valid RNG state file"):
        checkpoint.load(LoadingEngine(), tmp_path / "checkpoints", "step_1")
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_size"])
def test_a_corrupt_rng_file_is_refused(tmp_path, damage):
    checkpoint.save(LoadingEngine(), str(tmp_path), 1, {"step": 1}, keep_last=1)
    rng_file = tmp_path / "checkpoints" / "step_1" / "rng_rank0.safetensors"
    if damage == "truncate":
        rng_file.write_bytes(rng_file.read_bytes()[:-100])
    elif damage == "garbage":
        rng_file.write_bytes(os.urandom(4096))
    else:  # a well-formed safetensors file whose python state has the wrong length
        from safetensors.torch import load_file, save_file

        tensors = load_file(rng_file)
        tensors["python"] = tensors["python"][:-1].clone()
        save_file(tensors, rng_file, metadata={"scalars": json.dumps({"python": [3, None], "numpy": ["MT19937", 0]})})
    before = torch.get_rng_state()
    with pytest.raises(CheckpointError, match="rng_rank0.safetensors: not a valid RNG state file"):
        checkpoint.load(LoadingEngine(), tmp_path / "checkpoints", "step_1")
    assert torch.equal(torch.get_rng_state(), before)  # nothing was half restored


@pytest.mark.parametrize("old_file", ["genuine", "payload"])
def test_an_old_pickled_rng_file_is_refused_unloaded(tmp_path, old_file):
    checkpoint.save(LoadingEngine(), str(tmp_path), 1, {"step": 1}, keep_last=1)
    step = tmp_path / "checkpoints" / "step_1"
    (step / "rng_rank0.safetensors").unlink()
    if old_file == "genuine":  # what the previous format wrote
        torch.save(
            {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
            step / "rng_rank0.pt",
        )
    else:
        write_payload(step / "rng_rank0.pt", tmp_path / "marker", "torch.save")
    with pytest.raises(CheckpointError, match=r"rng_rank0\.pt: this checkpoint predates the safe RNG format") as e:
        checkpoint.load(LoadingEngine(), step.parent, "step_1")
    assert "checkpoint.resume=none" in str(e.value)
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_deepspeed_files_are_loaded_weights_only(tmp_path, writer, monkeypatch):
    """DeepSpeed's own torch.load(weights_only=False) is forced weights-only: a tampered file is refused, unrun."""
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    checkpoint.save(TorchLoadingEngine(), str(tmp_path), 1, {"step": 1}, keep_last=1)
    step = tmp_path / "checkpoints" / "step_1"
    write_payload(step / "mp_rank_00_model_states.pt", tmp_path / "marker", writer)
    with pytest.raises(CheckpointError, match="step_1: refusing to unpickle"):
        checkpoint.load(TorchLoadingEngine(), step.parent, "step_1")
    assert not (tmp_path / "marker").exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored afterwards


def test_deepspeed_optimizer_objects_are_allowed(tmp_path):
    """What ZeRO optimizer files hold besides tensors and plain data (checked on real ZeRO 0-3 files) still loads."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    class OptimizerEngine(TorchLoadingEngine):
        def save_checkpoint(self, save_dir, tag, client_state, save_latest):
            objects = {
                "loss_scaler": [LossScaler(1), DynamicLossScaler(2**16, 1000, 1, 2, False, dtype=torch.half)],
                "zero_stage": ZeroStageEnum.gradients,
                "param_slice_mappings": [{"w": fragment_address(numel=2, start=0)}],
            }
            super().save_checkpoint(save_dir, tag, {**client_state, **objects}, save_latest)

    checkpoint.save(OptimizerEngine(), str(tmp_path), 1, {"step": 1}, keep_last=1)
    client = checkpoint.load(OptimizerEngine(), tmp_path / "checkpoints", "step_1")
    assert client["zero_stage"] is ZeroStageEnum.gradients
    assert client["loss_scaler"][1].cur_scale == 2**16 and client["loss_scaler"][1].dtype == torch.half
    assert client["param_slice_mappings"][0]["w"] == fragment_address(numel=2, start=0)


def test_load_of_a_missing_checkpoint_is_an_error(tmp_path):
    class Empty:
        def load_checkpoint(self, load_dir, tag):
            return None, None

    checkpoint._save_rng(tmp_path / "rng_rank0.safetensors")
    (tmp_path / "step_1").mkdir()
    os.replace(tmp_path / "rng_rank0.safetensors", tmp_path / "step_1" / "rng_rank0.safetensors")
    with pytest.raises(CheckpointError, match="step_1"):
        checkpoint.load(Empty(), tmp_path, "step_1")
    (tmp_path / "step_1" / "rng_rank0.safetensors").unlink()  # a missing RNG state is damage, not a silent skip
    with pytest.raises(CheckpointError, match="rng_rank0.safetensors: missing"):
        checkpoint.load(Empty(), tmp_path, "step_1")


# --- gathered_state_dict ---------------------------------------------------------------------------------------------


def test_gathered_state_dict_on_a_plain_module_equals_state_dict():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    model(torch.randn(5, 4))  # update the BatchNorm running stats (persistent buffers)
    got, want = gathered_state_dict(model), model.state_dict()
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name])
        assert got[name].device.type == "cpu"
        assert got[name].data_ptr() != want[name].data_ptr()  # a copy, not a view of the live weights


def test_gathered_state_dict_skips_non_persistent_buffers():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32)
    )
    assert set(gathered_state_dict(model)) == set(model.state_dict())
