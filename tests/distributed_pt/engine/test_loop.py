import os
import signal

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
    assert not loop.should_stop(state) and not state.stopping
    monkeypatch.setattr(loop.dist, "all_reduce_sum", real_reduce)
    assert loop.should_stop(state) and state.stopping
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
