"""Checkpoints: which one a run resumes from, the atomic `latest`, pruning, and the gathered state dict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from distributed_pt import checkpoint
from distributed_pt.checkpoint import LATEST, find_resume, gathered_state_dict


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


# --- find_resume -----------------------------------------------------------------------------------------------------


def test_auto_without_checkpoints(tmp_path):
    assert find_resume(str(tmp_path), "auto") is None
    (tmp_path / "checkpoints").mkdir()
    assert find_resume(str(tmp_path), "auto") is None


def test_auto_with_latest(tmp_path):
    root = tmp_path / "checkpoints"
    make_step(root, 10)
    make_step(root, 20)
    (root / LATEST).write_text("step_10\n")
    assert find_resume(str(tmp_path), "auto") == (root, "step_10")


def test_auto_ignores_step_dirs_that_latest_does_not_name(tmp_path):
    # A crash mid-save leaves a newer step directory but `latest` still names the previous complete one.
    root = tmp_path / "checkpoints"
    make_step(root, 10)
    (root / LATEST).write_text("step_10")
    make_step(root, 20)
    assert find_resume(str(tmp_path), "auto") == (root, "step_10")
    # A first save that crashed: a step directory and no `latest` at all → start fresh.
    other = tmp_path / "other"
    make_step(other / "checkpoints", 5)
    assert find_resume(str(other), "auto") is None


def test_none_never_resumes(tmp_path):
    root = tmp_path / "checkpoints"
    make_step(root, 10)
    (root / LATEST).write_text("step_10")
    assert find_resume(str(tmp_path), "none") is None


def test_explicit_checkpoints_dir_and_step_dir(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    step = make_step(root, 30)
    make_step(root, 40)
    (root / LATEST).write_text("step_40")
    assert find_resume("unused", str(root)) == (root, "step_40")
    assert find_resume("unused", str(step)) == (root, "step_30")


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
    assert (path / "rng_rank0.pt").is_file()
    assert not list(root.glob(".*tmp"))  # the temporary file was renamed into place
    assert find_resume(str(tmp_path), "auto") == (root, "step_5")


def test_crash_mid_save_keeps_the_previous_latest(tmp_path):
    checkpoint.save(FakeEngine(), str(tmp_path), 5, {"step": 5}, keep_last=2)
    with pytest.raises(RuntimeError, match="mid-save"):
        checkpoint.save(FakeEngine(crash=True), str(tmp_path), 10, {"step": 10}, keep_last=2)
    root = tmp_path / "checkpoints"
    assert (root / "step_10").is_dir()  # partially written
    assert find_resume(str(tmp_path), "auto") == (root, "step_5")


@pytest.mark.parametrize("keep_last", [1, 2, 3])
def test_keep_last_prunes_the_oldest(tmp_path, keep_last):
    for step in (1, 2, 3, 10):  # numeric order: step_10 is the newest (not lexical)
        checkpoint.save(FakeEngine(), str(tmp_path), step, {"step": step}, keep_last=keep_last)
    root = tmp_path / "checkpoints"
    kept = sorted(int(p.name.split("_")[1]) for p in root.glob("step_*"))
    assert kept == [1, 2, 3, 10][-keep_last:]
    assert (root / LATEST).read_text() == "step_10"


def test_load_restores_rng_and_returns_client_state(tmp_path):
    class LoadingEngine(FakeEngine):
        def load_checkpoint(self, load_dir, tag):
            return str(Path(load_dir) / tag), json.loads((Path(load_dir) / tag / "client_state.json").read_text())

    torch.manual_seed(0)
    checkpoint.save(LoadingEngine(), str(tmp_path), 7, {"step": 7, "micro_step": 14}, keep_last=2)
    expected = torch.rand(3)
    torch.manual_seed(123)
    root, tag = find_resume(str(tmp_path), "auto")
    assert checkpoint.load(LoadingEngine(), root, tag) == {"step": 7, "micro_step": 14}
    torch.testing.assert_close(torch.rand(3), expected)


def test_load_of_a_missing_checkpoint_is_an_error(tmp_path):
    class Empty:
        def load_checkpoint(self, load_dir, tag):
            return None, None

    with pytest.raises(FileNotFoundError, match="step_1"):
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
