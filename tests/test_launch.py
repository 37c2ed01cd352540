"""The launch scripts: syntax, two simulated nodes through `launch/multi_node.sh` (no-ssh mode), one node through
`launch/single_node.sh`, and `launch/slurm.sbatch` against stand-ins for srun/scontrol/deepspeed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, SFT_CONFIG, TINY_SFT, env, free_port, run_launcher, train_losses

LAUNCH = ROOT / "launch"
SCRIPTS = ["single_node.sh", "multi_node.sh", "slurm.sbatch"]
CONFIG = "configs/sft_tiny.yaml"
# The venv's launcher, whatever PATH holds (the scripts honour DEEPSPEED).
DEEPSPEED = f"{sys.executable} -m deepspeed.launcher.runner"


@pytest.mark.parametrize("script", SCRIPTS)
def test_syntax(script):
    subprocess.run(["bash", "-n", LAUNCH / script], check=True)


@pytest.mark.parametrize("script", ["single_node.sh", "multi_node.sh"])
def test_usage(script):
    proc = subprocess.run(["bash", LAUNCH / script], capture_output=True, text=True)
    assert proc.returncode == 2 and "CONFIG" in proc.stderr
    proc = subprocess.run(["bash", LAUNCH / script, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "MASTER_PORT" in proc.stdout


def test_multi_node_needs_a_hostfile(tmp_path):
    e = dict(env(), HOSTFILE=str(tmp_path / "missing"), NODE_RANK="0")
    proc = subprocess.run(["bash", LAUNCH / "multi_node.sh", CONFIG], env=e, capture_output=True, text=True)
    assert proc.returncode == 2 and "hostfile not found" in proc.stderr


def _tail(path: Path, n: int = 6000) -> str:
    return f"--- {path.name}\n{path.read_text()[-n:]}"


@pytest.mark.slow
def test_two_simulated_nodes_no_ssh(tmp_path):
    """Two 'nodes' (localhost and 127.0.0.1, one rank each) rendezvous over TCP and train one ZeRO-2 job."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    out = tmp_path / "out"
    # global_batch_size = micro 8 x 2 ranks: the config check fails the run unless both nodes joined one world.
    overrides = [*TINY_SFT, f"output_dir={out}", "train.max_steps=6", "train.global_batch_size=16"]
    overrides.append("deepspeed.config=configs/deepspeed/zero2.json")
    base = dict(env(), HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    base["DEEPSPEED"] = DEEPSPEED
    procs, logs = [], []
    try:
        for node in (0, 1):
            logs.append(tmp_path / f"node{node}.log")
            with logs[-1].open("w") as log:
                procs.append(
                    subprocess.Popen(
                        ["bash", LAUNCH / "multi_node.sh", CONFIG, *overrides],
                        cwd=ROOT,
                        env=dict(base, NODE_RANK=str(node)),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # its own process group, to clean up launcher and rank together
                    )
                )
        deadline = time.time() + 300
        codes = [p.wait(timeout=max(1.0, deadline - time.time())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    logs_text = "\n".join(_tail(log) for log in logs)
    assert codes == [0, 0], logs_text
    node0, node1 = (log.read_text() for log in logs)

    # Each node's launcher saw a world of two and its own node rank; rank 0 (node 0) alone prints.
    for node, text in enumerate((node0, node1)):
        assert "dist_world_size=2" in text and f"nnodes=2, num_local_procs=1, node_rank={node}" in text, logs_text
    assert "step=1 loss=" in node0 and "step=1 loss=" not in node1

    # Every step logged, and the loss fell.
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, 7)), losses
    assert sum(losses[s] for s in (4, 5, 6)) < 0.95 * sum(losses[s] for s in (1, 2, 3)), losses

    # Both ranks wrote their own ZeRO-2 optimizer shard and RNG state into the shared checkpoint.
    ckpt = out / "checkpoints" / "step_6"
    for r in (0, 1):
        assert (ckpt / f"rng_rank{r}.safetensors").is_file()
        assert (ckpt / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").is_file(), sorted(os.listdir(ckpt))
    assert "global_batch_size: 16" in (out / "config.yaml").read_text()


@pytest.mark.slow
def test_single_node_one_rank(tmp_path):
    e = dict(env(), NUM_GPUS="1", MASTER_PORT=str(free_port()), DEEPSPEED=DEEPSPEED)
    overrides = [*TINY_SFT, f"output_dir={tmp_path}", "train.max_steps=3", "checkpoint.export_hf=false"]
    proc = subprocess.run(
        ["bash", LAUNCH / "single_node.sh", CONFIG, *overrides],
        cwd=ROOT,
        env=e,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    assert "--num_gpus 1" in proc.stderr  # the command is echoed (set -x)
    assert "dist_world_size=1" in proc.stdout + proc.stderr
    assert sorted(train_losses(tmp_path)) == [1, 2, 3]


# Stand-ins for Slurm and DeepSpeed: `srun` starts its command once per "node" with SLURM_NODEID set and passes
# SIGTERM on; `deepspeed` records its arguments and hostfile and, with FAKE_SLEEP, waits for a signal.
FAKES = {
    "scontrol": """
if [[ "$1 $2" == "show hostnames" ]]; then printf 'localhost\\n127.0.0.1\\n'; else echo "$*" >>"$FAKE_LOG/scontrol"; fi
""",
    "srun": """
echo "$*" >"$FAKE_LOG/srun"
while [[ $1 == -* ]]; do shift; done
trap 'kill -TERM $(jobs -pr) 2>/dev/null' TERM
for node in 0 1; do SLURM_NODEID=$node "$@" & done
while [[ -n $(jobs -pr) ]]; do wait; done
""",
    "deepspeed": """
args="$*"
node=${args#*--node_rank }; node=${node%% *}
hostfile=${args#*--hostfile }; hostfile=${hostfile%% *}
[[ -n ${FAKE_SLEEP:-} ]] && trap 'echo TERM >>"$FAKE_LOG/deepspeed-$node"; kill $! 2>/dev/null; exit 143' TERM
{ echo "$args"; cat "$hostfile"; } >"$FAKE_LOG/deepspeed-$node"
if [[ -n ${FAKE_SLEEP:-} ]]; then sleep 60 & wait; fi
""",
}


def _fake_slurm(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    e = dict(env(), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(tmp_path), TMPDIR=str(tmp_path))
    e.update(SLURM_JOB_NODELIST="node[1-2]", SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(ROOT))
    e.update(SLURM_CPUS_PER_TASK="16", SLURM_GPUS_ON_NODE="2")
    for key in ("MASTER_ADDR", "MASTER_PORT", "DEEPSPEED", "DS_ARGS", "HOSTFILE", "NODE_RANK"):
        e.pop(key, None)
    return e


def test_slurm_script_starts_one_no_ssh_launcher_per_node(tmp_path):
    proc = subprocess.run(
        ["bash", LAUNCH / "slurm.sbatch", CONFIG, "output_dir=/shared/run"],
        env=_fake_slurm(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--ntasks-per-node=1 --cpus-per-task=16" in (tmp_path / "srun").read_text()
    for node in (0, 1):
        args, *hosts = (tmp_path / f"deepspeed-{node}").read_text().splitlines()
        assert hosts == ["localhost slots=2", "127.0.0.1 slots=2"]
        assert f"--no_ssh --node_rank {node} --master_addr localhost --master_port 24242" in args
        assert args.endswith(f"--module distributed_pt.train {CONFIG} output_dir=/shared/run")
    assert not (tmp_path / "scontrol").exists()  # no requeue


@pytest.mark.parametrize(
    "sig, status, requeued",
    [
        (signal.SIGUSR1, 0, True),  # what `#SBATCH --signal=B:USR1@300` delivers: time is up, come back
        (signal.SIGTERM, 143, False),  # what `scancel` delivers to the batch shell: stop, and wait for the ranks
    ],
)
def test_slurm_signals_stop_the_ranks(tmp_path, sig, status, requeued):
    proc = subprocess.Popen(
        ["bash", LAUNCH / "slurm.sbatch", CONFIG],
        env=dict(_fake_slurm(tmp_path), FAKE_SLEEP="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 30
    while time.time() < deadline and not all((tmp_path / f"deepspeed-{n}").exists() for n in (0, 1)):
        time.sleep(0.05)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == status, output
    for node in (0, 1):
        assert (tmp_path / f"deepspeed-{node}").read_text().splitlines()[-1] == "TERM", output
    if requeued:
        assert (tmp_path / "scontrol").read_text().split() == ["requeue", "4242"]
    else:
        assert not (tmp_path / "scontrol").exists()


def test_a_finished_run_leaves_no_shared_memory_behind(tmp_path):
    """DeepSpeed's CPU all-reduce buffers (64 MiB per rank in /dev/shm) are removed when a run ends."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    before = set(shm.glob("deepspeed_allreduce_buffer_*"))
    overrides = [*TINY_SFT, f"output_dir={tmp_path}", "train.max_steps=2", "eval.num_generate=0"]
    run_launcher(SFT_CONFIG, overrides)
    assert set(shm.glob("deepspeed_allreduce_buffer_*")) <= before
