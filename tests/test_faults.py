"""A job under its scheduler (issue 24), through the real launcher on 2 CPU ranks where it matters: signals reach the
ranks and the process the user started waits for them; one run per output dir; damaged checkpoints are named and
survived; a full disk is named; a failed start writes no config.yaml."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from distributed_pt.checkpoint import verify
from tests.conftest import ROOT, SFT_CONFIG, SFT_STEPS, TINY_SFT, env, launch_cmd, run_launcher, train_losses

LONG = ["train.max_steps=100000", "train.eval_every=0", "checkpoint.save_every=0"]


def _job(mark: Path) -> list[str]:
    """Processes of a job still alive, found by a path unique to it on their command lines (output dir or config)."""
    alive = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and any(str(mark) in a for a in p.info["cmdline"] or []):
            alive.append(" ".join(p.info["cmdline"]))
    return alive


def _start(cmd: list[str], out: Path, log: Path, **extra_env: str) -> subprocess.Popen:
    """Start `cmd` and return once its run has logged a training step."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(env(), **extra_env), stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if " loss=" in log.read_text(errors="replace"):  # this run's console: step=N loss=...
            return proc
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no training step within 240 s (exit {proc.poll()}):\n{log.read_text()[-4000:]}")


def _stopped_with_a_checkpoint(proc: subprocess.Popen, out: Path, log: Path, status: int = 143) -> None:
    assert proc.wait(timeout=120) == status, log.read_text()[-4000:]
    assert not _job(out), _job(out)  # nothing left running once the command has returned
    latest = (out / "checkpoints" / "latest").read_text()
    assert verify(out / "checkpoints" / latest) is None
    assert int(latest.split("_")[1]) >= 1


@pytest.mark.slow
def test_sigterm_to_single_node_script_saves_and_waits_for_the_ranks(tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    cmd = ["bash", str(ROOT / "launch" / "single_node.sh"), str(SFT_CONFIG), *TINY_SFT, f"output_dir={out}", *LONG]
    proc = _start(cmd, out, log, DEEPSPEED=f"{sys.executable} -m deepspeed.launcher.runner")
    proc.send_signal(signal.SIGTERM)
    _stopped_with_a_checkpoint(proc, out, log)
    assert "the ranks save a checkpoint and exit" in log.read_text()


@pytest.mark.slow
def test_sigterm_to_the_deepspeed_command_stops_the_ranks(tmp_path):
    # DeepSpeed's runner dies alone on a signal; the ranks notice and stop with a checkpoint (no orphan trains on).
    out, log = tmp_path / "out", tmp_path / "log"
    proc = _start(launch_cmd(SFT_CONFIG, [*TINY_SFT, f"output_dir={out}", *LONG]), out, log)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    deadline = time.time() + 120
    while _job(out) and time.time() < deadline:
        time.sleep(0.5)
    assert not _job(out), log.read_text()[-4000:]
    assert "the launcher" in log.read_text() and "is gone; saving a checkpoint" in log.read_text()
    assert verify(out / "checkpoints" / (out / "checkpoints" / "latest").read_text()) is None


@pytest.mark.slow
def test_sigterm_to_the_pipeline_saves_and_waits(tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    config = yaml.safe_load(SFT_CONFIG.read_text())
    config.update(output_dir=str(out))
    config["train"].update(max_steps=100000, eval_every=0, log_every=1, micro_batch_size=8)
    config["checkpoint"]["save_every"] = 0
    config["logging"] = {"wandb_mode": "disabled", "progress_bar": False}
    config["model"]["init_config"].update(hidden_size=64, intermediate_size=128)
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "distributed_pt.pipeline", "--stages", "sft", "--sft", str(tmp_path / "sft.yaml")]
    proc = _start(cmd, out, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, log.read_text()[-4000:]
    assert not _job(tmp_path / "sft.yaml")  # the ranks and launchers name the config: none is left
    latest = (out / "checkpoints" / "latest").read_text()
    assert verify(out / "checkpoints" / latest) is None


@pytest.mark.slow
def test_a_second_run_into_a_live_runs_output_dir_stops_at_once(tmp_path):
    out, log = tmp_path / "out", tmp_path / "first.log"
    one = [sys.executable, "-m", "distributed_pt.train", str(SFT_CONFIG), *TINY_SFT, f"output_dir={out}"]
    first = _start([*one, *LONG], out, log)
    try:
        second = subprocess.run(
            [*one, "optim.lr=1e-3", *LONG], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 2, second.stderr[-4000:]
        assert f"output_dir {out} is in use by another run (host " in second.stderr
        assert f"pid {first.pid}, started" in second.stderr
        assert "lr: 0.006" in (out / "config.yaml").read_text()  # the first run's, untouched
    finally:
        first.send_signal(signal.SIGTERM)
    _stopped_with_a_checkpoint(first, out, log)
    # a lock left by a run that died is taken over, and said
    lock = out / ".run.lock"
    assert lock.read_text() == ""  # a run that stopped cleanly leaves the lock empty
    lock.write_text("host elsewhere, pid 1, started earlier\n")
    resumed = subprocess.run(
        [*one, "train.max_steps=1", "checkpoint.export_hf=false"], cwd=ROOT, env=env(), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "taking over from a run that ended without finishing (host elsewhere, pid 1" in resumed.stdout


@pytest.fixture
def sft_copy(sft_zero2_run, tmp_path) -> Path:
    """A copy of the shared 40-step ZeRO-2 SFT run (checkpoints at steps 20 and 40) to damage."""
    out = tmp_path / "run"
    subprocess.run(["cp", "-r", str(sft_zero2_run), str(out)], check=True)
    (out / ".run.lock").unlink(missing_ok=True)
    return out


@pytest.mark.slow
# (a truncated or empty model-states file, a deleted `latest`, a flipped byte: tests/distributed_pt/test_checkpoint.py)
@pytest.mark.parametrize("damage", ["optimizer_of_rank1_truncated", "rng_of_rank1_missing"])
def test_a_damaged_latest_checkpoint_is_named_and_the_previous_one_resumes_exactly(sft_copy, damage):
    step40 = sft_copy / "checkpoints" / "step_40"
    if damage == "optimizer_of_rank1_truncated":
        f = step40 / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        f.write_bytes(f.read_bytes()[:100])
    else:
        f = step40 / "rng_rank1.safetensors"
        f.unlink()
    expected = train_losses(sft_copy)
    overrides = [*TINY_SFT, f"output_dir={sft_copy}", f"train.max_steps={SFT_STEPS}", "checkpoint.save_every=20"]
    proc = run_launcher(SFT_CONFIG, [*overrides, "deepspeed.config=configs/deepspeed/zero2.json"])
    said = proc.stdout + proc.stderr
    assert f"checkpoint {step40} is damaged ({f}:" in said, said[-4000:]
    assert "set aside as damaged_step_40" in said and "resuming from" in said and "step_20" in said
    assert (sft_copy / "checkpoints" / "damaged_step_40").is_dir()  # nothing deleted
    # resumed at 20 on both ranks, retrained 21..40 to the same losses as the uninterrupted run
    assert "step=21 loss=" in said and "step=20 loss=" not in said  # steps 21..40 trained again
    assert train_losses(sft_copy) == expected  # metrics.jsonl rewritten from step 21: the same losses, bit for bit
    assert verify(sft_copy / "checkpoints" / "step_40") is None


@pytest.mark.slow
def test_no_complete_checkpoint_stops_with_the_way_out(sft_copy):
    for step in (20, 40):
        f = sft_copy / "checkpoints" / f"step_{step}" / "mp_rank_00_model_states.pt"
        f.write_bytes(b"")
    overrides = [*TINY_SFT, f"output_dir={sft_copy}", f"train.max_steps={SFT_STEPS + 2}"]
    proc = run_launcher(SFT_CONFIG, overrides, check=False)
    assert proc.returncode != 0
    said = proc.stdout + proc.stderr
    assert "no complete checkpoint to resume" in said and "mp_rank_00_model_states.pt: 0 bytes" in said, said[-4000:]
    assert "checkpoint.resume=none" in said


@pytest.mark.slow
def test_a_full_disk_is_named_and_the_previous_checkpoint_stays(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        out = small / "out"
        cmd = [sys.executable, "-m", "distributed_pt.train", str(SFT_CONFIG), *TINY_SFT, f"output_dir={out}"]
        cmd += ["train.max_steps=40", "train.eval_every=0", "checkpoint.save_every=2", "checkpoint.keep_last=5"]
        cmd += ["checkpoint.export_hf=false", f"data.cache_dir={tmp_path / 'cache'}"]
        proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
        said = proc.stdout + proc.stderr
        assert proc.returncode == 1, said[-4000:]
        assert "no space left on device" in said and str(out / "checkpoints") in said, said[-4000:]
        latest = (out / "checkpoints" / "latest").read_text()
        assert verify(out / "checkpoints" / latest) is None and f"{latest} stays the resume point" in said
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


@pytest.mark.slow
def test_a_failed_start_writes_no_config(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "distributed_pt.train", str(SFT_CONFIG), *TINY_SFT, f"output_dir={out}"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    proc = subprocess.run([*cmd, f"data.train_files=[{bad}]"], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert proc.returncode == 2 and f"{bad}:2" in proc.stderr, proc.stderr[-4000:]
    assert not (out / "config.yaml").exists()


def test_single_node_picks_a_free_port_unless_one_is_given():
    """Two jobs on one machine no longer cross-wire on 29500: without MASTER_PORT the script asks the OS for a free
    port (a stand-in launcher, `echo`, prints what it would run)."""
    script = str(ROOT / "launch" / "single_node.sh")

    def port(**extra: str) -> int:
        e = {k: v for k, v in env().items() if k != "MASTER_PORT"}
        out = subprocess.run(["bash", script, str(SFT_CONFIG)], env={**e, "DEEPSPEED": "echo", **extra},
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        return int(out.split("--master_port ")[1].split()[0])

    picked = port()
    assert picked != 29500  # the old fixed default (a free port is that one about once in 28,000)
    with socket.socket() as s:  # it was free: it can be bound now that nothing listens on it
        s.bind(("", picked))
    assert port(MASTER_PORT="29611") == 29611


@pytest.mark.slow
def test_kill_9_of_a_rank_during_saves_never_leaves_an_unloadable_latest(tmp_path):
    """A rank killed at arbitrary points of a run that saves every step: `latest` always names a complete checkpoint
    (by its manifest), and the next run resumes from it."""
    out = tmp_path / "out"
    overrides = [*TINY_SFT, f"output_dir={out}", *LONG[:2], "checkpoint.save_every=1", "checkpoint.keep_last=2"]
    root = out / "checkpoints"
    for i, delay in enumerate((0.3, 1.1)):  # rank 0, then rank 1
        log = tmp_path / f"run{i}.log"
        proc = _start(launch_cmd(SFT_CONFIG, overrides), out, log)
        time.sleep(delay)
        ranks = [
            p for p in psutil.process_iter(["cmdline"]) if f"output_dir={out}" in " ".join(p.info["cmdline"] or [])
        ]
        victim = next(p for p in ranks if f"--local_rank={i % 2}" in p.info["cmdline"])
        victim.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=120) != 0
        deadline = time.time() + 60
        while _job(out) and time.time() < deadline:
            time.sleep(0.2)
        latest = (root / "latest").read_text()
        assert verify(root / latest) is None, (latest, log.read_text()[-3000:])
    step = int((root / "latest").read_text().split("_")[1])
    proc = run_launcher(SFT_CONFIG, [*TINY_SFT, f"output_dir={out}", f"train.max_steps={step + 1}"])
    assert f"resumed from {root / f'step_{step}'} at step {step}" in proc.stdout + proc.stderr
