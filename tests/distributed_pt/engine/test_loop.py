import os
import signal
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from distributed_pt.engine import loop
from tests.conftest import DEMO


@pytest.fixture
def sigterm_restored():
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


def test_sigterm_during_the_stop_all_reduce_is_not_lost(monkeypatch, sigterm_restored):
    """The signal lands after this step's flag was read (inside the all-reduce): the next step must still stop."""
    state = loop.State()
    state.install_sigterm()
    real_reduce = loop.dist.all_reduce_sum

    def reduce_then_signal(t):
        out = real_reduce(t)
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before this returns
        return out

    monkeypatch.setattr(loop.dist, "all_reduce_sum", reduce_then_signal)
    assert not loop.should_stop(state)
    monkeypatch.setattr(loop.dist, "all_reduce_sum", real_reduce)
    assert loop.should_stop(state)
    assert loop.should_stop(state), "once requested, a stop stays requested"


def test_fingerprint_follows_the_training_bytes_and_the_tokenizer(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(DEMO / "tokenizer")
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    before = loop.fingerprint(tokenizer, [str(data)])
    assert loop.fingerprint(tokenizer, [str(data)]) == before
    data.write_text('{"prompt": "a", "response": "c"}\n')
    changed = loop.fingerprint(tokenizer, [str(data)])
    assert changed["tokenizer"] == before["tokenizer"] and changed["training data"] != before["training data"]
    tokenizer.add_tokens(["<new>"])
    assert loop.fingerprint(tokenizer, [str(data)])["tokenizer"] != before["tokenizer"]


def test_a_step_on_disk_is_not_written_again(monkeypatch):
    """The final save after a loop that just saved the same step (or a run resumed at its last step) writes nothing."""
    written = []
    monkeypatch.setattr(loop.checkpoint, "save", lambda engines, out, step, client, keep: written.append(step))
    cfg = SimpleNamespace(output_dir="out", checkpoint=SimpleNamespace(keep_last=2))
    state = loop.State(step=3)
    loop.save(None, cfg, state)
    loop.save(None, cfg, state)
    state.step = 4
    loop.save(None, cfg, state)
    assert written == [3, 4]


def test_a_resumed_run_says_only_what_changed_in_its_config(tmp_path, capsys):
    from distributed_pt.config import load_config
    from tests.conftest import ROOT

    cfg = load_config(ROOT / "configs" / "sft_tiny.yaml", [])
    loop.write_config(cfg, tmp_path)
    loop.write_config(cfg, tmp_path)  # the same config (tuples such as optim.betas come back from YAML as lists)
    assert "config changed" not in capsys.readouterr().out
    loop.write_config(load_config(ROOT / "configs" / "sft_tiny.yaml", ["optim.lr=0.5"]), tmp_path)
    out = capsys.readouterr().out
    assert "config changed" in out and "optim.lr:" in out and "0.5" in out and "betas" not in out
