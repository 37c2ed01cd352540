"""Memory and speed of one SFT training step (forward, backward, optimizer step) on DeepSpeed ZeRO.

Llama-style models are built with random weights from size presets (``PRESETS``) through the framework's own path
(``load_model`` → ``apply_lora`` → ``use_fused_loss`` → ``build_ds_config`` → ``initialize(Backbone(model))`` →
``lm_loss``). Providers (modes): ``full`` fine-tuning, ``lora`` (r=16 on all attention and MLP projections,
torch path, logits + torch cross-entropy), ``lora_fused`` (the Triton LoRA kernel + the fused LM-head
cross-entropy) and ``peft`` (the peer: PEFT's ``get_peft_model`` with the same r, alpha and projections on the same
model, logits + torch cross-entropy, same engine, data and seeds). Cases: size × ZeRO stage × optimizer offload ×
gradient checkpointing at a sequence length and micro batch. Each case runs in fresh processes, one per rank
(DeepSpeed engines do not free all memory on ``del``); a case that runs out of memory is recorded as not fitting
(``fit`` = 0) and the sweep goes on.

Per rank it records the model-state bytes actually held (``model_state_bytes``: parameters, gradients, optimizer
state, counted tensor by tensor between backward and step), the ZeRO paper's prediction (``zero_model_state_bytes``)
and their ratio; on CUDA also peak allocated/reserved memory and MFU; step time and tokens/s. benchmarks/README.md
explains every column.

Usage::

    python -m benchmarks.bench_memory                      # default GPU sweep (below) → benchmarks/results/
    python -m benchmarks.bench_memory --sizes 125m,1b,3b,8b --seq 2048 --micro-batch 1 --zero 0,1,2,3 \\
        --modes full,lora,lora_fused,peft --checkpointing both --offload both --out benchmarks/results
    python -m benchmarks.bench_memory --cpu                # CPU sweep → bench_memory_cpu.json/.md/.png

Default GPU sweep: sizes 125m, 1b, 3b, 8b × ZeRO 2, 3 × all four modes, with gradient checkpointing, no offload:
32 cases of 25–30 s each on one H100 (timed 2026-11-23 with the first three modes: process start, random init on the
GPU, DeepSpeed initialize, 2 warm-up + 3 timed steps; the first case also JIT-builds FusedAdam, ~40 s), ~16 min in
all: more than one 10-minute command, so the default ``--budget-min`` 9 skips the last cases; split the sizes over
commands (``benchmarks/gpu_suite.sh`` runs 1b and 8b at ZeRO-2). With
one GPU the stages cannot partition (N = 1): stages 0–2 predict the same 16Ψ. Offload cases are skipped above
``--offload-max-size`` (3b: DeepSpeedCPUAdam on 8B needs ~100 GB of pinned host memory and seconds per step). Cases
still waiting when ``--budget-min`` runs out are recorded as skipped, so the command always ends with results.

CPU sweep (``--cpu``, ~7 min on 2 cores): presets tiny (4.2M) and small (30M, tied embeddings), seq 128, micro batch
1, 2 gloo ranks at every stage, bf16 (ZeRO 0–3, offload and the interpreted kernels all work in bf16 on CPU), offload
at stages 1–3, no checkpointing (it changes no model state, only time). ``lora_fused`` runs interpreted
(``TRITON_INTERPRET=1``) on tiny without offload only: a step of small took 59 s. A case whose predicted model state
exceeds ``--mem-cap-gib`` (CPU default: half the host RAM over the ranks) is recorded as not fitting before any weight
is allocated; on CUDA the cap is a real allocator limit (``torch.cuda.set_per_process_memory_fraction``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import make_record, save_results
from benchmarks.memory_case import PRESETS, Case, run_child

BENCH = "bench_memory"
ROOT = Path(__file__).resolve().parent.parent
MARKER = "@@bench_memory@@"
MODES = ("full", "lora", "lora_fused", "peft")
# On CPU the Triton kernels run interpreted: a step of "small" took 59 s (tiny: 2-6 s), so lora_fused runs on these
# only, and without offload (with it, the same kernels; cut to keep the CPU sweep under 10 minutes).
CPU_FUSED_SIZES = ("micro", "tiny")
# The sweeps' defaults (see the module docstring); any flag overrides its entry.
GPU_DEFAULTS = dict(sizes="125m,1b,3b,8b", seq=2048, zero="2,3", checkpointing="on", offload="off", steps=3,
                    budget_min=9.0)  # fmt: skip
CPU_DEFAULTS = dict(sizes="tiny,small", seq=128, zero="0,1,2,3", checkpointing="off", offload="both", steps=2,
                    budget_min=20.0, world=2)  # fmt: skip


def _host_ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def launch(case: Case, *, steps: int, mem_cap_gib: float | None, timeout_s: float, cpu: bool) -> list[dict]:
    """Run one case in ``case.world`` fresh processes (one per rank, env vars as torchrun sets them).

    Returns:
        One result per rank: status ok / oom / error / timeout / aborted (stopped after a peer failed), and on ok
        the measurements of ``_measure``.
    """
    from distributed_pt.dist import free_port

    spec = json.dumps({"case": dataclasses.asdict(case), "steps": steps, "mem_cap_gib": mem_cap_gib})
    port, threads = str(free_port()), str(max(1, (os.cpu_count() or 1) // case.world))
    procs, logs = [], []
    for rank in range(case.world):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(case.world),
            LOCAL_WORLD_SIZE=str(case.world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            PYTHONUNBUFFERED="1",
            HF_HUB_OFFLINE="1",
        )
        env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
        env.setdefault("OMP_NUM_THREADS", threads)
        if cpu:
            env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
            if case.mode == "lora_fused":
                env["TRITON_INTERPRET"] = "1"  # the Triton kernels run interpreted on CPU
        logs.append(tempfile.TemporaryFile(mode="w+"))
        cmd = [sys.executable, "-m", "benchmarks.bench_memory", "--child", spec]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logs[-1], stderr=subprocess.STDOUT, start_new_session=True)
        )
    deadline, timed_out = time.monotonic() + timeout_s, False
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline:
            timed_out = True
            break
        done = [i for i, p in enumerate(procs) if p.poll() is not None]
        if any(procs[i].returncode != 0 or _read_result(logs[i]).get("status") != "ok" for i in done):
            break  # one rank failed: its peers would wait in a collective until the timeout
        time.sleep(0.2)
    killed = set()
    for i, p in enumerate(procs):
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # our own child's session (start_new_session), nothing else
            p.wait()
            killed.add(i)
    results = []
    for i, p in enumerate(procs):
        res = _read_result(logs[i])
        if not res:
            tail = " | ".join(_log_text(logs[i]).strip().splitlines()[-3:])[-400:]
            if i in killed:
                res = {
                    "status": "timeout" if timed_out else "aborted",
                    "note": f"killed after {timeout_s:.0f} s" if timed_out else "stopped after a peer failed",
                }
            else:
                res = {"status": "error", "note": f"exit code {p.returncode}: {tail}"}
            res["rank"] = i
        results.append(res)
        logs[i].close()
    return results


def _log_text(log) -> str:
    log.seek(0)
    return log.read()


def _read_result(log) -> dict:
    """The child's MARKER line (read only once the child has exited: the log's offset is shared with it)."""
    lines = [ln for ln in _log_text(log).splitlines() if ln.startswith(MARKER)]
    try:
        return json.loads(lines[-1][len(MARKER) :]) if lines else {}
    except json.JSONDecodeError:
        return {}


def aggregate(results: list[dict]) -> dict:
    """One case's result from its ranks: the first failure, else the worst rank's memory and step time."""
    for status in ("oom", "error", "timeout", "aborted"):
        bad = [r for r in results if r.get("status") == status]
        if bad:
            partial = next((r for r in results if "predicted" in r), {})
            return {**partial, "status": status, "note": f"rank {bad[0]['rank']}: {bad[0].get('note', '')}"}
    totals = [sum(sum(d.values()) for d in r["measured"].values()) for r in results]
    worst = results[max(range(len(results)), key=totals.__getitem__)]
    agg = {**results[0], "per_rank_model_state": totals, "model_state": max(totals), "breakdown": worst["measured"]}
    for key in ("step_s", "peak_alloc", "peak_reserved"):
        if key in results[0]:
            agg[key] = max(r[key] for r in results)
    if "mfu" in results[0]:
        agg["mfu"] = min(r["mfu"] for r in results)
    return agg


def records_for(case: Case, res: dict, bench: str, cuda: bool) -> list[dict]:
    """The flat records of one case × mode; the first metric is the one the harness plots."""
    nan = float("nan")
    scale, unit = (2**30, "GiB") if cuda else (2**20, "MiB")
    pred = res.get("predicted", {}).get("total", nan)
    state = res.get("model_state", nan)
    rows = []
    if cuda:
        rows += [("peak_alloc", res.get("peak_alloc", nan) / scale, unit)]
        rows += [("peak_reserved", res.get("peak_reserved", nan) / scale, unit)]
    rows += [
        ("model_state", state / scale, unit),
        ("predicted", pred / scale, unit),
        ("state_ratio", state / pred, "x"),
    ]
    if cuda:
        rows += [("peak_ratio", res.get("peak_alloc", nan) / pred, "x")]
    rows += [("step_time", res.get("step_s", nan), "s"), ("tokens_per_s", res.get("tokens_per_s", nan), "tok/s")]
    if cuda:
        rows += [("mfu", res.get("mfu", nan), "%")]
    rows += [("fit", {"ok": 1.0, "oom": 0.0}.get(res["status"], nan), "1=fits")]
    extra = {"status": res["status"], "dtype": case.dtype}
    extra.update({k: res[k] for k in ("note", "n_params", "n_trainable") if k in res})
    out = []
    for metric, value, u in rows:
        rec = make_record(bench, case.fields(), case.mode, metric, value, u) | extra
        if metric == "model_state" and "breakdown" in res:
            rec.update(breakdown_bytes=res["breakdown"], per_rank_bytes=res["per_rank_model_state"])
        if metric == "predicted" and "predicted" in res:
            rec["predicted_bytes"] = res["predicted"]
        out.append(rec)
    return out


def sweep(
    plan: list[tuple[Case, str | None]],
    *,
    bench: str,
    steps: int,
    mem_cap_gib: float | None,
    case_timeout_s: float,
    budget_s: float,
    cpu: bool,
) -> list[dict]:
    """Run every planned case (a reason instead of None skips it) and return all records; never raises on a case."""
    start, records = time.monotonic(), []
    for case, reason in plan:
        if reason is None and time.monotonic() - start > budget_s:
            reason = f"time budget of {budget_s / 60:.1f} min spent"
        if reason is not None:
            res = {"status": "skipped", "note": reason}
        else:
            res = aggregate(launch(case, steps=steps, mem_cap_gib=mem_cap_gib, timeout_s=case_timeout_s, cpu=cpu))
            if res["status"] == "ok":
                res["tokens_per_s"] = case.world * case.micro_batch * case.seq / res["step_s"]
        line = f"{case.mode:10s} {json.dumps(case.fields())}: {res['status']}"
        if res["status"] == "ok":
            line += (
                f"  model state {res['model_state'] / 2**20:.1f} MiB (predicted "
                f"{res['predicted']['total'] / 2**20:.1f}), {res['step_s']:.3f} s/step"
            )
            if "peak_alloc" in res:
                line += f", peak {res['peak_alloc'] / 2**30:.2f} GiB"
        print(f"[{time.monotonic() - start:5.0f} s] {line} {res.get('note', '')}", flush=True)
        records += records_for(case, res, bench, cuda=not cpu)
    return records


def make_plan(args: argparse.Namespace, cpu: bool) -> list[tuple[Case, str | None]]:
    """Cases in sweep order (size, stage, offload, checkpointing, mode), each with a skip reason or None."""
    sizes, modes = args.sizes.split(","), args.modes.split(",")
    unknown = [s for s in [*sizes, args.offload_max_size] if s not in PRESETS] + sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"unknown size(s) or mode(s) {unknown}; presets: {', '.join(PRESETS)}; modes: {MODES}")
    both = {"on": [True], "off": [False], "both": [False, True]}
    stages = [int(z) for z in args.zero.split(",")]
    order, plan = list(PRESETS), []
    grid = itertools.product(sizes, stages, both[args.offload], both[args.checkpointing], modes)
    for size, zero, offload, ckpt, mode in grid:
        if offload and zero == 0:
            continue  # offload needs a ZeRO optimizer
        reason = None
        if offload and order.index(size) > order.index(args.offload_max_size):
            reason = f"offload skipped above {args.offload_max_size} (--offload-max-size)"
        elif cpu and mode == "lora_fused" and size not in CPU_FUSED_SIZES:
            reason = "Triton interpreter too slow at this size on CPU (small: 59 s/step); GPU only"
        elif cpu and mode == "lora_fused" and offload:
            reason = "interpreted kernels with offload: left out on CPU for time (see offload=off)"
        case = Case(size, args.seq, args.micro_batch, zero, offload, ckpt, args.world, mode, args.dtype)
        plan.append((case, reason))
    return plan


def write_notes(md_path: Path, records: list[dict]) -> None:
    """Append what is counted and every case that did not run, with its reason, to the rendered table."""
    lines = [
        "",
        "## Notes",
        "",
        "- `model_state`: this rank's parameters (ZeRO-3: its partition + persistent/gathered ones), gradients "
        "(`.grad` + ZeRO gradient partitions) and optimizer state (fp32 master + Adam moments + step scalars), "
        "each storage once, taken between backward and step; the largest rank. Activations and communication "
        "buffers are not counted (see `benchmarks/bench_memory.py`).",
        "- `predicted`: ZeRO paper, mixed-precision Adam: 2Ψ weights + 2Ψ grads + 12Ψ optimizer; stage 1 "
        "4Ψ + 12Ψ/N, stage 2 2Ψ + 14Ψ/N, stage 3 16Ψ/N; for LoRA the frozen weights hold only the 2Ψ term.",
        "- `fit`: 1 ran, 0 out of memory (did not fit), n/a skipped or failed (below).",
        "",
    ]
    seen = set()
    for r in records:
        key = (r["case"], r["provider"])
        if r.get("status") != "ok" and key not in seen:
            seen.add(key)
            lines.append(f"- `{r['case']}` {r['provider']}: {r['status']}: {r.get('note', '')}")
    lines += peer_ratios(records)
    with md_path.open("a") as f:
        f.write("\n".join(lines) + "\n")


def peer_ratios(records: list[dict]) -> list[str]:
    """Markdown lines comparing our LoRA modes with the peers of the same case: tokens/s over ``full``'s and
    ``peft``'s, and memory over ``peft``'s (CUDA: peak allocated; CPU: model state). Issue 18's goals: ≥ 1.3× full
    at 1b, ≥ 1.3× peft at 8b, memory ≤ 1× peft. Empty when no case has a peer."""
    value = {(r["case"], r["provider"], r["metric"]): r["value"] for r in records if r.get("status") == "ok"}
    memory = "peak_alloc" if any(m == "peak_alloc" for _, _, m in value) else "model_state"

    def ratio(case: str, ours: str, peer: str, metric: str) -> str:
        a, b = value.get((case, ours, metric)), value.get((case, peer, metric))
        return f"{a / b:.2f}x" if a is not None and b else "n/a"

    rows = []
    for case in dict.fromkeys(r["case"] for r in records):
        if not any((case, peer, "tokens_per_s") in value for peer in ("full", "peft")):
            continue
        for ours in ("lora", "lora_fused"):
            if (case, ours, "tokens_per_s") in value:
                cells = (ratio(case, ours, "full", "tokens_per_s"), ratio(case, ours, "peft", "tokens_per_s"))
                cells += (ratio(case, ours, "peft", memory),)
                rows.append(f"| {case} | {ours} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    head = ["", "## Our LoRA against the peers (same case, same run)", ""]
    head += [f"| case | mode | tokens/s ÷ full | tokens/s ÷ peft | {memory} ÷ peft |", "|---|---|---:|---:|---:|"]
    return head + rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="CPU sweep: tiny/small, seq 128, 2 gloo ranks")
    parser.add_argument("--sizes", help=f"comma-separated presets ({', '.join(PRESETS)})")
    parser.add_argument("--seq", type=int, help="sequence length (GPU 2048, CPU 128)")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--zero", help="ZeRO stages (GPU 2,3; CPU 0,1,2,3)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--checkpointing", choices=("on", "off", "both"), help="gradient checkpointing (GPU on)")
    parser.add_argument("--offload", choices=("on", "off", "both"), help="optimizer offload to CPU (GPU off)")
    parser.add_argument("--offload-max-size", default="3b", help="skip offload cases above this preset")
    parser.add_argument("--world", type=int, help="ranks per case (GPU: all visible GPUs; CPU: 2)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--steps", type=int, help="timed steps after 2 warm-up steps (GPU 3, CPU 2)")
    parser.add_argument("--mem-cap-gib", type=float, help="memory cap per rank (CPU default: RAM / 2 / ranks)")
    parser.add_argument("--case-timeout", type=float, default=300.0, help="seconds before a case is killed")
    parser.add_argument("--budget-min", type=float, help="start no case after this many minutes (GPU 9, CPU 20)")
    parser.add_argument("--out", default="benchmarks/results", help="results folder")
    parser.add_argument("--name", help="results file stem (default bench_memory, or bench_memory_cpu with --cpu)")
    parser.add_argument("--wandb", metavar="PROJECT", help="also log the records as a W&B table")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one rank of one case (internal)
    args = parser.parse_args(argv)
    if args.child:
        result = run_child(json.loads(args.child))
        print(MARKER + json.dumps(result), flush=True)
        if result["status"] != "ok":
            os._exit(0)  # peers may wait in a collective: the parent ends them; no teardown that could hang here
        return

    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch looks for a GPU: records say cpu
    elif not torch.cuda.is_available():
        sys.exit(f"{BENCH}: needs a CUDA GPU (none found); use --cpu for the CPU sweep")
    cpu = args.cpu
    defaults = CPU_DEFAULTS if cpu else {**GPU_DEFAULTS, "world": torch.cuda.device_count()}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if cpu and args.mem_cap_gib is None:
        args.mem_cap_gib = _host_ram_bytes() / 2 / args.world / 2**30
    bench = args.name or (f"{BENCH}_cpu" if cpu else BENCH)

    plan = make_plan(args, cpu)
    print(f"{bench}: {len(plan)} cases, {args.world} rank(s) each, {args.dtype}", flush=True)
    t0 = time.monotonic()
    records = sweep(
        plan,
        bench=bench,
        steps=args.steps,
        mem_cap_gib=args.mem_cap_gib,
        case_timeout_s=args.case_timeout,
        budget_s=args.budget_min * 60,
        cpu=cpu,
    )
    path = save_results(bench, records, args.out, wandb_project=args.wandb)
    write_notes(path.with_suffix(".md"), records)
    print(path.with_suffix(".md").read_text())
    print(f"wrote {path}, {path.with_suffix('.md')}, {path.with_suffix('.png')} in {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
