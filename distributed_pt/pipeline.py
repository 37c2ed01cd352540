"""The whole InstructGPT pipeline, SFT → preference pairs → reward model → PPO, each training stage through the
`deepspeed` launcher; or, with `--rl grpo`, SFT → GRPO with programmatic rewards (the demo tasks' checker); or, with
`--rl dpo`, SFT → preference pairs → DPO (no reward model, no rollouts).

    python -m distributed_pt.pipeline                      # the bundled tiny demo (2 CPU ranks without a GPU)
    python -m distributed_pt.pipeline --rl grpo            # SFT → GRPO
    python -m distributed_pt.pipeline --rl dpo             # SFT → pairs → DPO
    python -m distributed_pt.pipeline --rl grpo --rollout-engine vllm   # rollouts by vLLM (the vllm extra)
    python -m distributed_pt.pipeline --rl grpo --stages grpo --set grpo.advantage_estimator=rloo \
        --set output_dir=outputs/grpo_rloo                 # GRPO again from the same SFT model, with overrides
    python -m distributed_pt.pipeline --nproc 8 --sft my_sft.yaml --rm my_rm.yaml --ppo my_ppo.yaml

The stage configs chain through their paths (rm's model.path is sft's output_dir/final, and so on). The `pairs` step
samples the SFT model on the training prompts and labels its answers with the demo's checker
(`distributed_pt.data.sample_pairs`), standing in for InstructGPT's human comparisons of model outputs; the RM
config trains on those pairs beside the bundled ones, and so does the DPO config. At the end a table of each stage's
held-out results before and after it is printed and written to `<output root>/summary.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

# (stage, metric key, label) rows of the summary table
ROWS = [
    ("sft", "eval/exact_match", "held-out exact match"),
    ("sft", "eval/loss", "held-out loss"),
    ("rm", "eval/accuracy", "held-out pair accuracy"),
    ("rm", "eval/margin", "held-out reward margin"),
    ("ppo", "eval/score", "held-out RM score (normalised)"),
    ("ppo", "eval/exact_match", "held-out exact match"),
    ("grpo", "eval/reward", "held-out reward"),
    ("grpo", "eval/exact_match", "held-out exact match"),
    *[("grpo", f"eval/exact_match/{t}", f"held-out exact match: {t}") for t in ("add", "count", "reverse", "sort")],
    ("dpo", "eval/exact_match", "held-out exact match"),
    *[("dpo", f"eval/exact_match/{t}", f"held-out exact match: {t}") for t in ("add", "count", "reverse", "sort")],
    ("dpo", "eval/rewards/accuracy", "held-out pair accuracy (implicit reward)"),
    ("dpo", "eval/rewards/margin", "held-out implicit reward margin"),
]
STAGE_ORDER = {"ppo": "sft,pairs,rm,ppo", "grpo": "sft,grpo", "dpo": "sft,pairs,dpo"}


def run_stage(config: Path, nproc: int, overrides: list[str]) -> float:
    from distributed_pt.dist import free_port

    # --log_level error: the runner's "Unable to find hostfile" warning means one machine, which is the point here
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--log_level", "error", "--num_gpus", str(nproc),
           "--master_port", str(free_port()), "--module", "distributed_pt.train", str(config), *overrides]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")  # said, not detected: DeepSpeed warns when it has to guess
    print(f"\n=== {config.name}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    run_job(cmd, env)
    return time.perf_counter() - start


def run_job(cmd: list[str], env: dict[str, str]) -> None:
    """Run the launcher in a process group of its own and wait for every process of it. SIGTERM, SIGINT or SIGHUP to
    the pipeline is passed to the ranks (each saves a checkpoint and exits), and the pipeline then exits 143 once they
    are gone, as launch/single_node.sh does; a stage that fails raises CalledProcessError."""
    import psutil

    job = subprocess.Popen(cmd, env=env, start_new_session=True)
    stopping: list[int] = []

    def stop(signum, frame) -> None:
        stopping.append(signum)
        print("pipeline: signal received: the ranks save a checkpoint and exit (status 143)", flush=True)
        ranks = [p for p in psutil.process_iter(["cmdline"]) if _is_rank(p.info["cmdline"]) and _pgid(p.pid) == job.pid]
        for p in ranks:
            p.send_signal(signal.SIGTERM)
        if not ranks:
            os.killpg(job.pid, signal.SIGTERM)

    handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        job.wait()
        while _group_alive(job.pid):  # launch.py and the ranks outlive the launcher briefly
            time.sleep(0.5)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if stopping:
        sys.exit(143)
    if job.returncode:
        raise subprocess.CalledProcessError(job.returncode, cmd)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _is_rank(cmdline: list[str] | None) -> bool:
    """`python -u -m distributed_pt.train ...` (DeepSpeed's launchers name the module after --module instead)."""
    cmdline = cmdline or []
    return any(a == "-m" and b == "distributed_pt.train" for a, b in zip(cmdline, cmdline[1:], strict=False))


def summary_table(results: dict[str, tuple[dict, float]]) -> str:
    lines = ["| stage | metric | before | after |", "| --- | --- | --- | --- |"]
    for stage, key, label in ROWS:
        if stage not in results:
            continue
        summary, _ = results[stage]
        before, after = summary["before"].get(key), summary["after"].get(key)
        if after is not None:
            lines.append(f"| {stage} | {label} | {_fmt(before)} | {_fmt(after)} |")
    lines.append("")
    lines.append("| stage | steps | wall time |")
    lines.append("| --- | --- | --- |")
    for stage, (summary, seconds) in results.items():
        lines.append(f"| {stage} | {summary['steps']} | {seconds:.0f} s |")
    return "\n".join(lines)


def provenance() -> str:
    """Device, date, git sha and versions: demo figures move with library versions (random init, kernels)."""
    from distributed_pt.logging import PACKAGES, environment

    env = environment()
    versions = ", ".join(f"{p} {env[p]}" for p in PACKAGES)
    dirty = " (uncommitted changes)" if env["git_dirty"] == "true" else ""
    return f"{env['device']} · {env['date']} · git {env['git_sha']}{dirty} · {versions}"


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=None, help="ranks per stage (default: all GPUs, or 2 on CPU)")
    parser.add_argument("--sft", default="configs/sft_tiny.yaml")
    parser.add_argument("--rm", default="configs/rm_tiny.yaml")
    parser.add_argument("--ppo", default="configs/ppo_tiny.yaml")
    parser.add_argument("--grpo", default="configs/grpo_tiny.yaml")
    parser.add_argument("--dpo", default="configs/dpo_tiny.yaml")
    parser.add_argument(
        "--rl", choices=sorted(STAGE_ORDER), default="ppo", help="; ".join(f"{k}: {v}" for k, v in STAGE_ORDER.items())
    )
    parser.add_argument("--pairs-prompts", default="distributed_pt/assets/demo/prompts_train.jsonl")
    parser.add_argument("--stages", help="comma-separated subset to run, in order (default: all of --rl's)")
    parser.add_argument(
        "--rollout-engine", choices=["hf", "vllm"], help="the RL stage's rollout.engine (default: its config's)"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for the RL stage (ppo, grpo or dpo); repeatable")  # fmt: skip
    args = parser.parse_args(argv)

    from distributed_pt.data.sample_pairs import main as sample_pairs
    from distributed_pt.paths import resolve_path

    nproc = args.nproc or (torch.cuda.device_count() or 2)
    results: dict[str, tuple[dict, float]] = {}
    stages = args.stages or STAGE_ORDER[args.rl]
    for stage in stages.split(","):
        if stage == "pairs":
            sft_out = Path(yaml.safe_load(resolve_path(args.sft).read_text())["output_dir"])
            sample_pairs([f"--model={sft_out / 'final'}", f"--prompts={resolve_path(args.pairs_prompts)}",
                          f"--out={sft_out / 'pref_samples.jsonl'}"])  # fmt: skip
            continue
        config = resolve_path(getattr(args, stage))  # yours, else the bundled one of that name
        overrides = []
        if stage in STAGE_ORDER:  # the RL stage
            overrides = [f"rollout.engine={args.rollout_engine}"] if args.rollout_engine and stage != "dpo" else []
            overrides += args.set
        seconds = run_stage(config, nproc, overrides)
        out_dirs = [o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")]
        out = Path(out_dirs[-1] if out_dirs else yaml.safe_load(config.read_text())["output_dir"])
        results[stage] = (json.loads((out / "summary.json").read_text()), seconds)
    table = summary_table(results) + "\n\n" + provenance()
    (out.parent / "summary.md").write_text(table + "\n")
    print("\n" + table, flush=True)


if __name__ == "__main__":
    main()
