"""Our GRPO step beside TRL's GRPOTrainer, both generating with Hugging Face `generate`: the same saved random-init
model (bench_trl's), the demo prompts, 16 prompts x 8 completions a step, up to 32 new tokens sampled at temperature 1,
the same reward functions and weights (ours, wrapped for TRL), the same clipped objective (eps 0.2 / 0.28, beta 0, one
pass, two optimizer steps of 64 completions per rollout), constant lr, one process each, fp32.

    pip install -e ".[bench]"
    python -m benchmarks.bench_trl_grpo --cpu                # demo and 25M models, 3 runs each
    python -m benchmarks.bench_trl_grpo --cpu --sizes demo --steps 4 --repeats 1   # a quick look

Per run: seconds per rollout-and-update cycle (128 completions: our step; two TRL optimizer steps sharing one
generation), the median over the cycles after the first two, and the completions' mean length (random weights stop at
EOS at random: the two sides' work is equal only on average), then completions per second; peak RSS (CPU) or peak
allocated memory (GPU); the repeats alternate ours and TRL's. Records `bench_trl_grpo_<device>.{json,md,png}` with
the ratios ours/TRL.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_trl import DEMO, ROOT, env, save_model, with_ratios
from benchmarks.harness import make_record, save_results

SETTINGS = {"prompts": 16, "generations": 8, "new_tokens": 32, "micro_batch_size": 64, "lr": 5e-6}
WARMUP = 2  # cycles left out (first generate, allocator growth)

TRL_RUN = """
import json, resource, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from distributed_pt.rl.rewards import exact_answer, format_reward

model_dir, data, out, steps, s = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
rows = [json.loads(line) for line in open(data)]
columns = [k for k in rows[0] if k != "prompt"]

def ours(fn):  # TRL passes the dataset's other columns as lists; ours take the rows
    def reward(prompts, completions, **kw):
        rows = [dict(prompt=p, **{k: kw[k][i] for k in columns}) for i, p in enumerate(prompts)]
        return fn(prompts, completions, rows)
    reward.__name__ = fn.__name__
    return reward

ends, lengths = [], []
class Clock(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        ends.append(time.perf_counter())
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "completions/mean_length" in logs:
            lengths.append(logs["completions/mean_length"])

config = GRPOConfig(output_dir=out, per_device_train_batch_size=s["micro_batch_size"], gradient_accumulation_steps=1,
    num_generations=s["generations"], generation_batch_size=s["prompts"] * s["generations"],
    max_completion_length=s["new_tokens"], temperature=1.0, top_p=1.0, beta=0.0, epsilon=0.2, epsilon_high=0.28,
    num_iterations=1, loss_type="grpo", scale_rewards="group", reward_weights=[1.0, 0.2], learning_rate=s["lr"],
    lr_scheduler_type="constant", warmup_steps=0, max_steps=steps, logging_steps=2, report_to="none",
    save_strategy="no", use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, seed=0, bf16=False,
    fp16=False, gradient_checkpointing=False, disable_dropout=True, shuffle_dataset=True)
trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
    reward_funcs=[ours(exact_answer), ours(format_reward)], args=config, train_dataset=Dataset.from_list(rows),
    processing_class=AutoTokenizer.from_pretrained(model_dir, padding_side="left"), callbacks=[Clock()])
trainer.train()
if torch.cuda.is_available():
    peak = torch.cuda.max_memory_allocated() / 2**30
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print("TRL_RESULT", json.dumps({"ends": ends, "lengths": lengths, "peak_gib": peak}))
"""
OUR_STEP = re.compile(r"^step=(\d+) advantage_mean=.*completion_length=([0-9.e+-]+)")


def run_ours(model: Path, out: Path, cycles: int) -> dict[str, float]:
    """Our GRPO stage, one process: each step's line timed as it is printed."""
    s = SETTINGS
    overrides = [f"model.path={model}", f"output_dir={out}", f"train.max_steps={cycles}", "train.log_every=1",
                 "train.eval_every=0", "eval.num_generate=0", "checkpoint.save_every=0", "checkpoint.export_hf=false",
                 f"grpo.rollout_batch_size={s['prompts']}", f"grpo.num_generations={s['generations']}",
                 f"grpo.max_new_tokens={s['new_tokens']}", f"train.micro_batch_size={s['micro_batch_size']}",
                 f"optim.lr={s['lr']}", "optim.warmup_steps=0", "optim.scheduler=constant", "grpo.sample_every=0",
                 "logging.wandb_mode=disabled", "logging.progress_bar=false",
                 "model.gradient_checkpointing=false"]  # fmt: skip
    cmd = [sys.executable, "-u", "-m", "distributed_pt.train", str(ROOT / "configs" / "grpo_tiny.yaml"), *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ends, lengths, tail = [], [], []
    for line in proc.stdout:
        tail = (tail + [line])[-40:]
        m = OUR_STEP.match(line)
        if m:
            ends.append(time.perf_counter())
            lengths.append(float(m.group(2)))
    if proc.wait():
        raise SystemExit(f"our GRPO run failed ({proc.returncode}):\n{''.join(tail)}")
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    peak = max(m["peak_mem_gib"] for m in metrics if "peak_mem_gib" in m)
    return summarise(ends, lengths, peak)


def run_trl(model: Path, out: Path, cycles: int) -> dict[str, float]:
    cmd = [sys.executable, "-c", TRL_RUN, str(model), str(DEMO / "prompts_train.jsonl"), str(out), str(2 * cycles),
           json.dumps(SETTINGS)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"TRL's GRPO run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.split("TRL_RESULT", 1)[1])
    return summarise(result["ends"][1::2], result["lengths"], result["peak_gib"])  # a cycle ends every second step


def summarise(ends: list[float], lengths: list[float], peak: float) -> dict[str, float]:
    """Median seconds per cycle after the warm-up, mean completion length, completions and tokens per second."""
    if len(ends) < WARMUP + 2:
        raise SystemExit(f"too few cycles timed ({len(ends)}): raise --steps")
    cycle_s = statistics.median(b - a for a, b in zip(ends[WARMUP:], ends[WARMUP + 1 :], strict=False))
    completions = SETTINGS["prompts"] * SETTINGS["generations"]
    length = statistics.mean(lengths[WARMUP:] or lengths)
    return {"cycle_s": cycle_s, "completions_per_s": completions / cycle_s, "completion_length": length,
            "completion_tokens_per_s": completions * length / cycle_s, "peak_mem": peak}  # fmt: skip


UNITS = {"cycle_s": "s", "completions_per_s": "1/s", "completion_length": "tokens",
         "completion_tokens_per_s": "tokens/s", "peak_mem": "GiB"}  # fmt: skip


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on CPU (device name in the record: cpu)")
    parser.add_argument("--sizes", default="demo,25m")
    parser.add_argument("--steps", type=int, default=10, help="rollout-and-update cycles per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    bench = f"bench_trl_grpo_{'cpu' if args.cpu else 'gpu'}"
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            model = save_model(size, Path(tmp))
            case = {"model": size, "completions": SETTINGS["prompts"] * SETTINGS["generations"],
                    "new_tokens": SETTINGS["new_tokens"]}  # fmt: skip
            sides = {"ours": run_ours, "trl": run_trl}
            runs: dict[str, list] = {name: [] for name in sides}
            for i in range(args.repeats):  # interleaved, as bench_trl's
                for name, run in sides.items():
                    runs[name].append(run(model, Path(tmp) / f"{size}-{name}-{i}", args.steps))
            for name in sides:
                result = {k: statistics.median(r[k] for r in runs[name]) for k in UNITS}
                print(f"{size} {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()), flush=True)
                records += [make_record(bench, case, name, k, v, UNITS[k]) for k, v in result.items()]
    return save_results(bench, with_ratios(records), args.out)


if __name__ == "__main__":
    main()
