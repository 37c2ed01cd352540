"""Run logging: metrics.jsonl with W&B disabled, truncation on resume, and the W&B `auto` mode."""

from __future__ import annotations

import json

import pytest

from distributed_pt.config import LoggingConfig
from distributed_pt.logging import RunLogger, wandb_mode


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def disabled() -> LoggingConfig:
    return LoggingConfig(wandb_mode="disabled")


def test_metrics_jsonl_with_wandb_disabled(tmp_path, capsys):
    out = tmp_path / "run"  # created by the logger
    logger = RunLogger(disabled(), str(out), config={"a": 1})
    assert logger.run is None
    logger.log({"loss": 1.5, "lr": 1e-3}, step=1)
    logger.log({"loss": 1.25, "tag": "x"}, step=2, console=False)
    logger.log_table("samples", ["a"], [["b"]], step=2)  # no W&B: a no-op
    logger.summary({"best": 1})
    logger.close()
    assert records(out / "metrics.jsonl") == [
        {"step": 1, "loss": 1.5, "lr": 1e-3},
        {"step": 2, "loss": 1.25, "tag": "x"},
    ]
    printed = capsys.readouterr().out
    assert "step=1 loss=1.5 lr=0.001" in printed and "step=2" not in printed
    assert not (out / "wandb").exists() and not (out / "wandb_run_id").exists()


def test_a_fresh_run_replaces_old_metrics(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 9, "loss": 0.1}) + "\n")
    logger = RunLogger(disabled(), str(tmp_path), config={})
    logger.log({"loss": 2.0}, step=1, console=False)
    assert records(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 2.0}]


def test_resume_truncates_to_the_resume_step(tmp_path):
    # A crashed run logged up to step 7; the last checkpoint was at step 4.
    lines = [{"step": s, "loss": 10.0 - s} for s in range(1, 8)] + [{"step": 4, "eval_acc": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    logger = RunLogger(disabled(), str(tmp_path), config={}, resume_step=4)
    assert [r["step"] for r in records(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 4]
    logger.log({"loss": 5.5}, step=5, console=False)
    got = records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 4, 5]
    assert got[-1] == {"step": 5, "loss": 5.5} and got[3] == {"step": 4, "loss": 6.0}


def test_resume_without_a_metrics_file(tmp_path):
    logger = RunLogger(disabled(), str(tmp_path), config={}, resume_step=3)
    logger.log({"loss": 1.0}, step=4, console=False)
    assert records(tmp_path / "metrics.jsonl") == [{"step": 4, "loss": 1.0}]


def test_resume_tolerates_a_partial_last_line(tmp_path):
    text = json.dumps({"step": 1, "loss": 2.0}) + "\n" + json.dumps({"step": 2, "loss": 1.0}) + "\n" + '{"step": 3, "lo'
    (tmp_path / "metrics.jsonl").write_text(text)
    RunLogger(disabled(), str(tmp_path), config={}, resume_step=2)
    assert [r["step"] for r in records(tmp_path / "metrics.jsonl")] == [1, 2]


# --- wandb mode ------------------------------------------------------------------------------------------------------


@pytest.fixture
def clean_wandb_env(tmp_path, monkeypatch):
    """No WANDB_* variables and a HOME without a real ~/.netrc."""
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def test_explicit_modes_are_kept(clean_wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    for mode in ("online", "offline", "disabled"):
        assert wandb_mode(LoggingConfig(wandb_mode=mode)) == mode


def test_auto_is_offline_without_a_key(clean_wandb_env):
    assert wandb_mode(LoggingConfig(wandb_mode="auto")) == "offline"


def test_auto_is_online_with_an_api_key(clean_wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(LoggingConfig()) == "online"
    monkeypatch.setenv("WANDB_API_KEY", "")
    assert wandb_mode(LoggingConfig()) == "offline"


def test_auto_reads_the_netrc_login(clean_wandb_env):
    netrc = clean_wandb_env / ".netrc"
    netrc.write_text("machine github.com\n  login me\n  password p\n")
    assert wandb_mode(LoggingConfig()) == "offline"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "x" * 40 + "\n")
    assert wandb_mode(LoggingConfig()) == "online"


def test_auto_follows_wandb_mode_variable(clean_wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(LoggingConfig()) == "disabled"


def test_run_id_is_stable_across_resumes(tmp_path):
    from distributed_pt.logging import _run_id

    first = _run_id(str(tmp_path))
    assert len(first) == 12 and _run_id(str(tmp_path)) == first
    other = tmp_path / "other"
    other.mkdir()
    assert _run_id(str(other)) != first  # another run directory gets its own id
    assert (tmp_path / "wandb_run_id").read_text().strip() == first
