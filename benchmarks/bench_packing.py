"""Sequence packing vs padding on length-skewed SFT data, and the tokenized cache's cold vs warm start.

Parts (one results file, ``bench_packing_<cpu|gpu model>.json`` + ``.md`` + ``.png``; benchmarks/README.md explains
every column):

* ``lengths``: seeded ``{"prompt", "response"}`` rows with lognormal token lengths cut to [4, max_length] (most rows
  short, a tail up to max_length), built from the demo tokenizer's words (one token each, so a row is exactly its
  drawn length) as a Markov chain the model can learn.
* ``train``: the same SFT run through the real launcher without (``padding``) and with (``packing``) packing, at equal
  real tokens per step (padding: ``--micro-batch`` samples; packing: that many samples' tokens in packed rows), from
  a cache built beforehand; tokens/s, padding, memory and loss from ``metrics.jsonl``, times from the step lines.
* ``cache``: ``load_sft_data`` on ``--rows`` rows (1M) in this process, cold (fresh cache_dir) then warm, then
  ``PackedDataset``, the first packed micro batch and the run fingerprint's second hash of the files.

Usage::

    python -m benchmarks.bench_packing            # GPU preset: 125m llama, bf16, ZeRO-2, checkpointing, 2048 tokens
    python -m benchmarks.bench_packing --cpu      # CPU preset: tiny llama, fp32, 2 ranks, 256 tokens
    python -m benchmarks.bench_packing --smoke --out /tmp/bench   # seconds: checks the script end to end
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
import yaml

from benchmarks.harness import make_record, render, save_results

BENCH = "bench_packing"
ROOT = Path(__file__).resolve().parent.parent
MIN_TOKENS = 4  # one prompt word, one response word, EOS, and one more word
JUMP = 0.25  # the Markov chain leaves the fixed successor this often
CORPUS_WORDS = 2_000_000
STEP_LINE = re.compile(r"^step=(\d+) loss=")
_LLAMA = dict(model_type="llama")
MODELS = {
    "micro": dict(_LLAMA, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2),
    "tiny": dict(_LLAMA, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, tie_word_embeddings=True),  # configs/sft_tiny.yaml's model
    "125m": dict(_LLAMA, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=32000, tie_word_embeddings=False),  # bench_memory's 125m
    "1b": dict(_LLAMA, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),  # Llama-3.2-1B shapes
}  # fmt: skip
PRESETS = {
    "gpu": dict(model="125m", dtype="bf16", max_length=2048, world=0, zero=2, ckpt=True, steps=40, warmup=5,
                micro_batch=16, lr=3e-4, train_rows=20_000, rows=1_000_000, timeout=900.0, prime=True),
    "cpu": dict(model="tiny", dtype="fp32", max_length=256, world=2, zero=2, ckpt=False, steps=40, warmup=5,
                micro_batch=32, lr=2e-3, train_rows=20_000, rows=1_000_000, timeout=900.0, prime=True),
    "smoke": dict(model="micro", dtype="fp32", max_length=64, world=1, zero=2, ckpt=False, steps=4, warmup=1,
                  micro_batch=8, lr=2e-3, train_rows=400, rows=2000, timeout=120.0, prime=False),
}  # fmt: skip


def vocab_words(tokenizer) -> list[str]:
    """The alphabetic words of the tokenizer's vocabulary (each one token under a whitespace pre-tokenizer)."""
    return sorted(w for w in tokenizer.get_vocab() if w.isalpha())


def row_lengths(n: int, max_length: int, seed: int, median_frac: float = 0.08, sigma: float = 1.0) -> np.ndarray:
    """Tokens per row: lognormal (median median_frac x max_length), rounded and cut to [MIN_TOKENS, max_length]."""
    raw = np.random.default_rng(seed).lognormal(np.log(median_frac * max_length), sigma, n)
    return np.clip(np.rint(raw), MIN_TOKENS, max_length).astype(np.int64)


def length_stats(lengths: np.ndarray, max_length: int) -> dict[str, float]:
    q = np.percentile(lengths, [50, 90, 99])
    stats = {"len_mean": float(lengths.mean()), "len_p50": float(q[0]), "len_p90": float(q[1]), "len_p99": float(q[2])}
    return stats | {"len_max": float(lengths.max()), "at_max": float((lengths >= max_length).mean())}


def write_rows(path: Path, lengths: np.ndarray, words: list[str], seed: int) -> None:
    """jsonl rows of exactly `lengths` tokens: `p` prompt words, `L - 1 - p` response words and the EOS the
    tokenization adds, cut from one seeded Markov-chain text."""
    rng = np.random.default_rng([seed, 1])
    order = np.array(words, dtype=object)[rng.permutation(len(words))]  # word k is followed by word k + 1
    jump = rng.random(CORPUS_WORDS) < JUMP
    jump[0] = True
    starts = np.flatnonzero(jump)
    seg = np.cumsum(jump) - 1
    pos = (rng.integers(0, len(words), len(starts))[seg] + np.arange(CORPUS_WORDS) - starts[seg]) % len(words)
    corpus = " ".join(order[pos].tolist())
    ends = np.cumsum(np.array([len(w) for w in order], dtype=np.int64)[pos] + 1)  # word i ends at ends[i] - 1
    offsets = np.concatenate([[0], ends]).tolist()
    n_prompt = np.clip((lengths * rng.uniform(0.2, 0.7, len(lengths))).astype(np.int64), 1, lengths - 2).tolist()
    first = rng.integers(0, CORPUS_WORDS - int(lengths.max()), len(lengths)).tolist()
    with path.open("w") as f:
        for start in range(0, len(lengths), 100_000):
            lines = []
            for i in range(start, min(start + 100_000, len(lengths))):
                s, p, n = first[i], n_prompt[i], int(lengths[i]) - 1
                prompt, response = corpus[offsets[s] : offsets[s + p] - 1], corpus[offsets[s + p] : offsets[s + n] - 1]
                lines.append(json.dumps({"prompt": prompt, "response": response}) + "\n")
            f.writelines(lines)


def plan_stats(lengths: np.ndarray, rows: list[list[int]] | None, mbs: int, world: int, seed: int, steps: int):
    """Real tokens and samples per step over the first `steps` steps, from the framework's own batch order
    (`ShardedBatches`); `rows` are the packed rows (sample indices), None for one sample per batch row."""
    from distributed_pt.data.collate import ShardedBatches

    if rows is None:
        item_len, item_n = lengths, np.ones(len(lengths), dtype=np.int64)
    else:
        item_len, item_n = np.array([lengths[r].sum() for r in rows]), np.array([len(r) for r in rows])
    tokens = samples = 0
    for rank in range(world):
        batches = ShardedBatches(len(item_len), mbs, rank, world, seed).iterate(0)
        for _ in range(steps):
            idx = next(batches)[1]
            tokens, samples = tokens + item_len[idx].sum(), samples + item_n[idx].sum()
    return {"tokens_per_step": tokens / steps, "samples_per_step": samples / steps}


def stage_config(args, data: Path, cache: Path, out: Path, packing: bool, mbs: int) -> dict:
    """The SFT config of one run: no eval, no export, one log line per step."""
    model = {
        "init_config": {**MODELS[args.model], "max_position_embeddings": args.max_length},
        "dtype": args.dtype,
        "gradient_checkpointing": args.ckpt,
        "attn_implementation": "sdpa" if args.cpu_run else "auto",
    }
    train = {"micro_batch_size": mbs, "max_steps": args.steps, "log_every": 1, "eval_every": 0, "seed": args.seed}
    return {"stage": "sft", "output_dir": str(out), "model": model, "train": train, "eval": {"num_generate": 0},
            "data": {"train_files": [str(data)], "max_length": args.max_length, "packing": packing,
                     "cache_dir": str(cache)},
            "optim": {"lr": args.lr, "warmup_steps": max(1, args.steps // 10), "scheduler": "cosine"},
            "deepspeed": {"config": f"configs/deepspeed/zero{args.zero}.json", "zero_stage": args.zero},
            "logging": {"wandb_mode": "disabled", "progress_bar": False, "run_name": out.name},
            "checkpoint": {"save_every": 0, "resume": "none", "export_hf": False}}  # fmt: skip


def launch(config: Path, world: int, timeout_s: float, cpu: bool) -> tuple[int, dict[int, float], float, str]:
    """One stage run through the DeepSpeed launcher. Returns (exit code, {step: seconds since start when its log line
    appeared}, wall seconds, the output's last lines)."""
    from distributed_pt.dist import free_port

    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world), "--master_port",
           str(free_port()), "--module", "distributed_pt.train", str(config)]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
    if cpu:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    killer = threading.Timer(timeout_s, lambda: os.killpg(proc.pid, signal.SIGKILL))  # our own child's session
    killer.start()
    steps, tail = {}, deque(maxlen=30)
    try:
        for line in proc.stdout:
            m = STEP_LINE.match(line)
            if m:
                steps[int(m[1])] = time.monotonic() - t0
            tail.append(line)
        rc = proc.wait()
    finally:
        killer.cancel()
    return rc, steps, time.monotonic() - t0, "".join(tail)


def train_result(args, out: Path, rc: int, steps: dict[int, float], wall: float, tail: str) -> dict:
    """What a run measured; status error with the output's tail when it failed."""
    path = out / "metrics.jsonl"
    logged = [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []
    logged = [m for m in logged if "loss" in m]
    if rc != 0 or len(logged) < args.steps:
        return {"status": "error", "note": f"exit code {rc}, {len(logged)} steps logged: " + tail[-600:]}
    after = [m for m in logged if m["step"] > args.warmup] or logged
    n = args.steps - args.warmup
    res = {
        "status": "ok",
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in after),
        "padding_fraction": statistics.fmean(m["padding_fraction"] for m in logged),
        "peak_mem": max(m["peak_mem_gib"] for m in logged),
        "final_loss": logged[-1]["loss"],
        "loss_last5": statistics.fmean(m["loss"] for m in logged[-5:]),
        "time_to_first_step": steps.get(1, float("nan")),
        "step_time": (steps[args.steps] - steps[args.warmup]) / n if n > 0 and args.warmup in steps else float("nan"),
        "wall_time": wall,
    }
    if "mfu" in after[0]:
        res["mfu"] = 100 * statistics.median(m["mfu"] for m in after)
    return res


def run_training(args, work: Path) -> list[dict]:
    """The records of the lengths and train parts."""
    from distributed_pt.config import ModelConfig, load_config
    from distributed_pt.data.packing import PackedDataset
    from distributed_pt.data.sft import load_sft_data
    from distributed_pt.engine.loop import data_cache
    from distributed_pt.models.loading import load_tokenizer

    tok = load_tokenizer(ModelConfig())  # the bundled demo tokenizer
    lengths = row_lengths(args.train_rows, args.max_length, args.seed, args.median_frac, args.sigma)
    data = work / f"train_{args.train_rows}_{args.max_length}.jsonl"
    write_rows(data, lengths, vocab_words(tok), args.seed)
    cache = work / "train_cache"
    records = []

    # Tokenize once here, with the data settings the runs will read, so both runs start from a warm cache; then a
    # 1-step run, not recorded, so that JIT builds (FusedAdam on GPU) and cold file caches fall on neither run.
    prime = stage_config(args, data, cache, work / "prime", False, args.micro_batch)
    prime["train"]["max_steps"] = 1
    (work / "prime.yaml").write_text(yaml.safe_dump(prime))
    cfg = load_config(work / "prime.yaml")
    train_set = load_sft_data(tok, cfg.data, cfg.train.seed, data_cache(cfg))[0]
    if args.prime:
        print(f"prime run (1 step): exit code {launch(work / 'prime.yaml', args.world, args.timeout, args.cpu_run)[0]}")
    if not np.array_equal(train_set.lengths, lengths):
        raise RuntimeError(f"{data}: the rows do not tokenize to their drawn lengths")
    packed = PackedDataset(train_set, args.max_length)
    fill = packed.efficiency(args.max_length)
    pack_mbs = args.pack_micro_batch or max(1, round(args.micro_batch * lengths.mean() / (fill * args.max_length)))
    world = args.world
    plans = {"padding": plan_stats(lengths, None, args.micro_batch, world, args.seed, args.steps),
             "packing": plan_stats(lengths, packed.rows, pack_mbs, world, args.seed, args.steps)}  # fmt: skip
    mbs, runs = {"padding": args.micro_batch, "packing": pack_mbs}, {}

    case = {"part": "train", "model": args.model, "seq": args.max_length, "world": world, "zero": args.zero,
            "ckpt": "on" if args.ckpt else "off", "dtype": args.dtype, "steps": args.steps}  # fmt: skip
    for provider, packing in (("padding", False), ("packing", True)):
        out = work / provider
        shutil.rmtree(out, ignore_errors=True)
        config = work / f"{provider}.yaml"
        config.write_text(yaml.safe_dump(stage_config(args, data, cache, out, packing, mbs[provider])))
        print(f"{provider}: micro batch {mbs[provider]}, {world} rank(s), {args.steps} steps", flush=True)
        runs[provider] = res = train_result(args, out, *launch(config, world, args.timeout, args.cpu_run))
        print(f"{provider}: {json.dumps(res)}", flush=True)
        records += _train_records(args.name, case, provider, res, mbs[provider], plans[provider])
    records.append(make_record(args.name, case, "packing", "fill", fill, "share"))
    if runs["padding"]["status"] == runs["packing"]["status"] == "ok":
        ratio = runs["packing"]["tokens_per_s"] / runs["padding"]["tokens_per_s"]
        records.append(make_record(args.name, case, "packing", "speedup", ratio, "x vs padding"))
    return records + length_records(args.name, lengths, args.max_length)


def length_records(bench: str, lengths: np.ndarray, max_length: int) -> list[dict]:
    case = {"part": "lengths", "rows": len(lengths), "seq": max_length}
    stats = length_stats(lengths, max_length).items()
    return [make_record(bench, case, "data", m, v, "share" if m == "at_max" else "tok") for m, v in stats]


def _train_records(bench: str, case: dict, provider: str, res: dict, mbs: int, plan: dict) -> list[dict]:
    nan, cuda = float("nan"), torch.cuda.is_available()
    rows = [("tokens_per_s", "tok/s"), ("padding_fraction", "share"), ("step_time", "s"),
            ("time_to_first_step", "s"), ("wall_time", "s"), ("final_loss", "nats"), ("loss_last5", "nats"),
            ("peak_mem", "GiB" if cuda else "GiB RSS")] + ([("mfu", "%")] if cuda else [])  # fmt: skip
    out = [make_record(bench, case, provider, m, res.get(m, nan), u) for m, u in rows]
    out += [make_record(bench, case, provider, "micro_batch", mbs, "rows"),
            make_record(bench, case, provider, "tokens_per_step", plan["tokens_per_step"], "tok"),
            make_record(bench, case, provider, "samples_per_step", plan["samples_per_step"], "samples")]  # fmt: skip
    return [r | {"status": res["status"], **({"note": res["note"]} if "note" in res else {})} for r in out]


def run_cache(args, work: Path) -> list[dict]:
    """Cold tokenize, warm load, pack and the first packed micro batch of `--rows` rows, in this process."""
    import datasets  # noqa: F401  (imported before the clocks start: both loads would pay it once)

    from distributed_pt.config import DataConfig, ModelConfig
    from distributed_pt.data.io import files_digest
    from distributed_pt.data.packing import PackedDataset, collate_packed
    from distributed_pt.data.sft import load_sft_data
    from distributed_pt.models.loading import load_tokenizer

    tok = load_tokenizer(ModelConfig())  # the bundled demo tokenizer
    t = time.perf_counter()
    lengths = row_lengths(args.rows, args.max_length, args.seed, args.median_frac, args.sigma)
    data = work / f"rows_{args.rows}_{args.max_length}.jsonl"
    write_rows(data, lengths, vocab_words(tok), args.seed)
    res = {"generate_s": time.perf_counter() - t, "file_mib": data.stat().st_size / 2**20}
    cfg = DataConfig(train_files=[str(data)], max_length=args.max_length, num_proc=args.num_proc)
    cache = work / "cache_timing"
    shutil.rmtree(cache, ignore_errors=True)
    log = io.StringIO()
    for name in ("cold_tokenize_s", "warm_load_s"):
        with contextlib.redirect_stdout(log):
            t = time.perf_counter()
            train_set = load_sft_data(tok, cfg, args.seed, cache)[0]
            res[name] = time.perf_counter() - t
    print(log.getvalue(), end="", flush=True)
    if "tokenized cache hit" not in log.getvalue():
        raise RuntimeError("the second load_sft_data did not hit the cache")
    t = time.perf_counter()
    packed = PackedDataset(train_set, args.max_length)
    res["pack_s"] = time.perf_counter() - t
    t = time.perf_counter()
    collate_packed(packed.examples(list(range(min(args.micro_batch, len(packed))))), tok.pad_token_id)
    res["first_batch_s"] = time.perf_counter() - t
    t = time.perf_counter()
    files_digest(cfg.train_files)  # the stage's resume fingerprint (engine.loop.fingerprint) hashes the files again
    res["fingerprint_s"] = time.perf_counter() - t
    res["warm_start_s"] = res["warm_load_s"] + res["pack_s"] + res["first_batch_s"] + res["fingerprint_s"]
    res["fill"] = packed.efficiency(args.max_length)
    res["cache_mib"] = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 2**20
    if not np.array_equal(train_set.lengths, lengths):
        raise RuntimeError(f"{data}: the rows do not tokenize to their drawn lengths")
    workers = re.search(r"with (\d+) workers", log.getvalue())  # the data layer's choice (data.dataset._build)
    case = {"part": "cache", "rows": args.rows, "seq": args.max_length, "workers": int(workers[1]) if workers else 0}
    units = {"fill": "share", "file_mib": "MiB", "cache_mib": "MiB"}
    records = [make_record(args.name, case, "data", m, v, units.get(m, "s")) for m, v in res.items()]
    return records + length_records(args.name, lengths, args.max_length)


def summary_tables(records: list[dict]) -> list[str]:
    """The same records, one compact table per part: train (metric x provider), lengths and cache (one row each)."""
    fmt = lambda v: "—" if v is None else f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"  # noqa: E731
    out = []
    for case in dict.fromkeys(r["case"] for r in records if r["part"] == "train"):
        recs = [r for r in records if r["case"] == case]
        val = {(r["provider"], r["metric"]): r["value"] for r in recs}
        out += [f"### train: {case}", "", "| metric | padding | packing | packing / padding |", "|---|---:|---:|---:|"]
        for m, unit in dict.fromkeys((r["metric"], r["unit"]) for r in recs if r["provider"] == "padding"):
            pad, pack = val.get(("padding", m)), val.get(("packing", m))
            ratio = pack / pad if pad and pack is not None else None
            out.append(f"| {m} ({unit}) | {fmt(pad)} | {fmt(pack)} | {fmt(ratio)} |")
        out.append("")
    for part in ("lengths", "cache"):
        recs = [r for r in records if r["part"] == part]
        metrics = list(dict.fromkeys((r["metric"], r["unit"]) for r in recs))
        if not recs:
            continue
        val = {(r["case"], r["metric"]): r["value"] for r in recs}
        out += [f"### {part}", "", "| case | " + " | ".join(f"{m} ({u})" for m, u in metrics) + " |"]
        out.append("|---|" + "---:|" * len(metrics))
        for case in dict.fromkeys(r["case"] for r in recs):
            out.append(f"| {case} | " + " | ".join(fmt(val.get((case, m))) for m, _ in metrics) + " |")
        out.append("")
    return out


def write_notes(md_path: Path, records: list[dict]) -> None:
    """Append the reading of the table, from the records alone: the goals, the micro-batch choice, and every run
    that failed."""
    val = {(r["part"], r["provider"], r["metric"]): r["value"] for r in records if r["part"] != "lengths"}
    lines = ["", *summary_tables(records), "## Notes", ""]
    if records and "preset" in records[0]:
        lines.append(f"- preset `{records[0]['preset']}`: {records[0].get('settings', '')}")
    if ("train", "packing", "micro_batch") in val:
        world = next(r["world"] for r in records if r["part"] == "train")
        pad, pack = ({m: val.get(("train", p, m), float("nan")) for m in ("micro_batch", "tokens_per_step",
                     "samples_per_step")} for p in ("padding", "packing"))  # fmt: skip
        lines.append(
            f"- Equal real tokens per step (not equal rows): padding {pad['micro_batch']:.0f} samples x {world} "
            f"rank(s) = {pad['tokens_per_step']:.0f} tokens, {pad['samples_per_step']:.0f} samples per step; packing "
            f"{pack['micro_batch']:.0f} packed rows x {world} = {pack['tokens_per_step']:.0f} tokens, "
            f"{pack['samples_per_step']:.0f} samples per step; next-fit fills "
            f"{val.get(('train', 'packing', 'fill'), float('nan')):.1%} of the packed rows' slots."
        )
    speed = val.get(("train", "packing", "speedup"))
    if speed is not None:
        verdict = "met" if speed >= 2 else "missed"
        lines.append(f"- Goal packing >= 2x real tokens/s over padding: **{verdict}** ({speed:.2f}x).")
    if ("cache", "data", "warm_start_s") in val:
        c = {m: v for (part, _, m), v in val.items() if part == "cache"}
        rows = next(r["rows"] for r in records if r["part"] == "cache")
        verdict = ("met" if c["warm_start_s"] < 10 else "missed") if rows >= 1_000_000 else "n/a below 1M rows"
        lines.append(f"- Goal warm start of 1M rows under 10 s: **{verdict}** ({rows} rows: {c['warm_start_s']:.2f} "
                     f"s = warm load {c['warm_load_s']:.2f} + pack {c['pack_s']:.2f} + first batch "
                     f"{c['first_batch_s']:.3f} + fingerprint {c.get('fingerprint_s', 0):.2f}; cold tokenize "
                     f"{c['cold_tokenize_s']:.1f} s).")  # fmt: skip
    lines += [
        "- tokens_per_s: real tokens of all ranks per second, median after warm-up; step_time: from the step lines' "
        "arrival times after warm-up; peak_mem: rank 0 (CPU: peak RSS); see benchmarks/README.md (bench_packing).",
    ]
    seen = set()
    for r in records:
        if r.get("status", "ok") != "ok" and r["provider"] not in seen:
            seen.add(r["provider"])
            lines.append(f"- {r['provider']}: {r['status']}: {r.get('note', '')}")
    with md_path.open("a") as f:
        f.write("\n".join(lines) + "\n")


def plot(png: Path, records: list[dict]) -> None:
    """Replaces the harness's bars of one metric over every case (mostly empty here) with one panel per figure that
    matters: real tokens/s, padding fraction and step time per provider, and the cache's seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    val = {(r["part"], r["provider"], r["metric"]): r["value"] for r in records if r["part"] != "lengths"}
    cache = ["cold_tokenize_s", "warm_load_s", "pack_s", "warm_start_s"]
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
    for ax, metric in zip(axes, ("tokens_per_s", "padding_fraction", "step_time"), strict=False):
        ax.bar(["padding", "packing"], [val.get(("train", p, metric), np.nan) for p in ("padding", "packing")],
               color=["C0", "C1"])  # fmt: skip
        ax.set_title(f"{metric} ({next((r['unit'] for r in records if r['metric'] == metric), '')})", fontsize=9)
    axes[3].bar([m.removesuffix("_s") for m in cache], [val.get(("cache", "data", m), np.nan) for m in cache])
    axes[3].set_yscale("log")
    rows = next((r["rows"] for r in records if r["part"] == "cache"), "no")
    axes[3].set_title(f"cache, {rows} rows (s)", fontsize=9)
    axes[3].tick_params(axis="x", labelsize=7)
    first = records[0]
    fig.suptitle(f"{first['bench']} — {first.get('device')} — {first.get('git_sha')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def device_suffix(cpu: bool) -> str:
    """'cpu', or the GPU's model in lower case ('NVIDIA H200' -> 'h200')."""
    words = ["cpu"] if cpu else torch.cuda.get_device_name().lower().replace("nvidia", "").split()
    return re.sub(r"[^a-z0-9]+", "", words[0]) if words else "gpu"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--cpu", action="store_true", help="CPU preset: tiny llama, 256 tokens, 2 ranks, 40 steps")
    mode.add_argument("--smoke", action="store_true", help="seconds: a micro model, 64 tokens, 1 rank, 4 steps")
    parser.add_argument("--model", choices=sorted(MODELS), help="random-init llama (GPU 125m, CPU tiny)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"))
    parser.add_argument("--max-length", type=int, help="data.max_length (GPU 2048, CPU 256)")
    parser.add_argument("--world", type=int, help="ranks (GPU: all visible GPUs; CPU 2)")
    parser.add_argument("--zero", type=int, choices=(0, 1, 2, 3))
    parser.add_argument("--ckpt", choices=("on", "off"), help="gradient checkpointing (GPU on, CPU off)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (GPU, CPU 40)")
    parser.add_argument("--warmup", type=int, help="steps left out of tokens/s and step time (5)")
    parser.add_argument("--micro-batch", type=int, help="padding's micro batch in samples (GPU 16, CPU 32)")
    parser.add_argument("--pack-micro-batch", type=int, help="packing's micro batch (default: equal tokens per step)")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--train-rows", type=int, help="rows of the training comparison's dataset (20000)")
    parser.add_argument("--rows", type=int, help="rows of the cold/warm cache timing (1000000)")
    parser.add_argument("--num-proc", type=int, help="tokenization workers (default: min(8, CPU count))")
    parser.add_argument("--median-frac", type=float, default=0.08, help="median row length / max_length")
    parser.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma of the row lengths")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", default="train,cache", help="train (lengths + runs), cache, or both")
    parser.add_argument("--timeout", type=float, help="seconds before a training run is killed")
    parser.add_argument("--prime", choices=("on", "off"), help="an unrecorded 1-step run first (on; smoke off)")
    parser.add_argument("--work-dir", type=Path, help="data, caches and run outputs (default: a temp dir, removed)")
    parser.add_argument("--out", default="benchmarks/results", help="results folder")
    parser.add_argument("--name", help="results file stem (default bench_packing_<cpu|gpu model>)")
    parser.add_argument("--render", type=Path, metavar="JSON", help="re-render a saved result (table, plot, notes)")
    args = parser.parse_args(argv)
    if args.render:
        (md, png), records = render(args.render), json.loads(args.render.read_text())
        write_notes(md, records)
        plot(png, records)
        return args.render
    preset = "smoke" if args.smoke else "cpu" if args.cpu else "gpu"
    args.cpu_run = preset != "gpu"
    if args.cpu_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch looks for a GPU: the records say cpu
    elif not torch.cuda.is_available():
        sys.exit(f"{BENCH}: the default preset needs a CUDA GPU (none found); use --cpu or --smoke")
    for key, value in PRESETS[preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.ckpt, args.prime = args.ckpt in (True, "on"), args.prime in (True, "on")
    args.world = args.world or torch.cuda.device_count()
    args.name = args.name or (f"{BENCH}_smoke" if args.smoke else f"{BENCH}_{device_suffix(args.cpu_run)}")

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_packing_"))
    work.mkdir(parents=True, exist_ok=True)
    t0, records = time.monotonic(), []
    try:
        if "train" in args.parts.split(","):
            records += run_training(args, work)
        if "cache" in args.parts.split(","):
            records += run_cache(args, work)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "name", "work_dir", "render", "cpu_run")}
    records = [r | {"preset": preset, "settings": json.dumps(settings, default=str)} for r in records]
    path = save_results(args.name, records, args.out)
    write_notes(path.with_suffix(".md"), records)
    plot(path.with_suffix(".png"), records)
    print(path.with_suffix(".md").read_text())
    print(f"wrote {path}, {path.with_suffix('.md')}, {path.with_suffix('.png')} in {time.monotonic() - t0:.0f} s")
    return path


if __name__ == "__main__":
    main()
