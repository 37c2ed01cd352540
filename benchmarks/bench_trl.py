"""Our SFT step beside TRL's SFTTrainer: the same random-init model (one saved directory), the same demo rows
(prompt → response, loss on the response only) in the same batches and order (TRL is handed our sampler's order and
reads it sequentially: an order's padding alone moves real tokens/s by ±1.3%), length limit, optimizer settings (fused
AdamW, the same betas, lr schedule and weight decay) and gradient checkpointing (off on both), one process each, fp32.

    pip install -e ".[bench]"                            # TRL is a bench extra, never a runtime dependency
    python -m benchmarks.bench_trl --cpu                 # two model sizes on CPU, 5 runs each
    python -m benchmarks.bench_trl --cpu --sizes demo --steps 8 --repeats 1   # a quick look

Per run: real (non-padding) tokens per second over the steps after the first logging window, and the process's peak
RSS (CPU) or peak allocated memory (GPU); the median of the repeats, which alternate ours and TRL's. The lowest and
highest tokens/s ratio of a pair of runs next to each other show the spread. Each side counts
its own tokens: ours the attention mask of the batches it trained (`tokens_per_s` in metrics.jsonl), TRL's its
`num_tokens` log. Records:
`bench_trl_<device>.{json,md,png}`, with the ratios ours/TRL (tokens/s: higher is better; memory: lower is better).
Timings on a shared 2-core CPU move by ±10% between runs: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import make_record, save_results

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "distributed_pt" / "assets" / "demo"
SIZES = {  # Llama shapes: the demo's and a 25M one
    "demo": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4},
    "25m": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8},
}
SETTINGS = {
    "micro_batch_size": 16,
    "max_length": 64,
    "lr": 1e-3,
    "betas": [0.9, 0.95],
    "weight_decay": 0.1,
    "warmup_steps": 5,
    "seed": 0,
}

# TRL's side, run in its own process: the same rows as prompt/completion pairs, in our order, read sequentially; a
# callback records TRL's token count and the wall clock at each log.
TRL_RUN = """
import json, resource, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

model_dir, data, out = sys.argv[1:4]
steps, log_every, s, order = int(sys.argv[4]), int(sys.argv[5]), json.loads(sys.argv[6]), json.loads(sys.argv[7])
rows = [json.loads(line) for line in open(data)]
ds = Dataset.from_list([{"prompt": rows[i]["prompt"], "completion": " " + rows[i]["response"]} for i in order])
clock = []  # (step, wall clock, TRL's count of real tokens so far) at each log

class Clock(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        clock.append((state.global_step, time.perf_counter(), (logs or {}).get("num_tokens")))

class InOrder(SFTTrainer):  # the dataset is already in our order
    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)

config = SFTConfig(output_dir=out, per_device_train_batch_size=s["micro_batch_size"], max_steps=steps,
    learning_rate=s["lr"], adam_beta1=s["betas"][0], adam_beta2=s["betas"][1], weight_decay=s["weight_decay"],
    warmup_steps=s["warmup_steps"], lr_scheduler_type="cosine",
    max_length=s["max_length"], packing=False, gradient_checkpointing=False, optim="adamw_torch_fused",
    logging_steps=log_every, report_to="none", save_strategy="no", use_cpu=not torch.cuda.is_available(),
    dataloader_num_workers=0, seed=s["seed"], bf16=False, fp16=False)
trainer = InOrder(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), args=config,
    train_dataset=ds, processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[Clock()])
trainer.train()
if torch.cuda.is_available():
    peak = torch.cuda.max_memory_allocated() / 2**30
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
print("TRL_RESULT", json.dumps({"clock": clock, "peak_gib": peak}))
"""


def save_model(size: str, where: Path) -> Path:
    """The random-init model both sides load (seed 0), with the demo tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(DEMO / "tokenizer")
    shape = SIZES[size]
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    config = LlamaConfig(vocab_size=len(tok), num_key_value_heads=shape["num_attention_heads"],
                         max_position_embeddings=128, tie_word_embeddings=True, **ids, **shape)  # fmt: skip
    torch.manual_seed(0)
    path = where / f"model-{size}"
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled", DS_ACCELERATOR="cpu")


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def run_ours(model: Path, out: Path, steps: int, log_every: int) -> tuple[float, float]:
    """(real tokens/s after the first logging window, peak GiB) of our SFT stage, one process."""
    s = SETTINGS
    overrides = [f"model.path={model}", "model.init_config=null", "model.dtype=fp32", f"output_dir={out}",
                 f"train.max_steps={steps}", f"train.micro_batch_size={s['micro_batch_size']}",
                 f"data.max_length={s['max_length']}", f"optim.lr={s['lr']}", f"optim.betas={s['betas']}",
                 f"optim.weight_decay={s['weight_decay']}", f"optim.warmup_steps={s['warmup_steps']}",
                 f"train.seed={s['seed']}",
                 "optim.scheduler=cosine", f"train.log_every={log_every}", "train.eval_every=0", "eval.num_generate=0",
                 "checkpoint.save_every=0", "checkpoint.export_hf=false", "logging.wandb_mode=disabled",
                 "logging.progress_bar=false", "model.gradient_checkpointing=false"]  # fmt: skip
    cmd = [sys.executable, "-m", "distributed_pt.train", str(ROOT / "configs" / "sft_tiny.yaml"), *overrides]
    _run(cmd, ROOT)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [m for m in metrics if "tokens_per_s" in m][1:]  # the first window holds the warm-up
    peak = max(m["peak_mem_gib"] for m in metrics if "peak_mem_gib" in m)
    return statistics.mean(m["tokens_per_s"] for m in windows), peak


def run_trl(model: Path, out: Path, steps: int, log_every: int) -> tuple[float, float]:
    from distributed_pt.data.collate import ShardedBatches

    data = DEMO / "sft_train.jsonl"  # every row becomes one of our examples (none is dropped at this max_length)
    n = len(data.read_text().splitlines())
    batches = ShardedBatches(n, SETTINGS["micro_batch_size"], 0, 1, SETTINGS["seed"])
    order = [i for _, batch in itertools.islice(batches.iterate(), steps) for i in batch]  # our first `steps` batches
    cmd = [sys.executable, "-c", TRL_RUN, str(model), str(data), str(out), str(steps), str(log_every),
           json.dumps(SETTINGS), json.dumps(order)]  # fmt: skip
    proc = _run(cmd, out.parent)
    result = json.loads(proc.stdout.split("TRL_RESULT", 1)[1])
    logs = [x for x in result["clock"] if x[2] is not None]
    (_, t0, n0), (_, t1, n1) = logs[0], logs[-1]  # from the end of the first window to the last log
    return (n1 - n0) / (t1 - t0), result["peak_gib"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on CPU (device name in the record: cpu)")
    parser.add_argument("--sizes", default="demo,25m")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)

    bench = f"bench_trl_{'cpu' if args.cpu else 'gpu'}"
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            model = save_model(size, Path(tmp))
            case = {"model": size, "batch": SETTINGS["micro_batch_size"], "max_length": SETTINGS["max_length"]}
            runs = {"ours": run_ours, "trl": run_trl}
            results: dict[str, list] = {name: [] for name in runs}
            for i in range(args.repeats):  # interleaved, so a drift of the machine's speed falls on both sides
                for name, run in runs.items():
                    results[name].append(run(model, Path(tmp) / f"{size}-{name}-{i}", args.steps, args.log_every))
            for name in runs:
                tokens = statistics.median(r[0] for r in results[name])
                peak = statistics.median(r[1] for r in results[name])
                print(f"{size} {name}: {tokens:.0f} real tokens/s, peak {peak:.3f} GiB", flush=True)
                records.append(make_record(bench, case, name, "tokens_per_s", tokens, "tokens/s"))
                records.append(make_record(bench, case, name, "peak_mem", peak, "GiB"))
            pairs = [o[0] / t[0] for o, t in zip(results["ours"], results["trl"], strict=True)]  # run next to run
            print(f"{size} ours/trl tokens/s, each pair: {' '.join(f'{r:.3f}' for r in pairs)}", flush=True)
            records.append(make_record(bench, case, "ours/trl", "tokens_per_s ratio, lowest pair", min(pairs), "x"))
            records.append(make_record(bench, case, "ours/trl", "tokens_per_s ratio, highest pair", max(pairs), "x"))
    save_results(bench, with_ratios(records), args.out)


def with_ratios(records: list[dict]) -> list[dict]:
    """`records` plus, per case and metric, ours / TRL (provider "ours/trl", unit "x")."""
    value = {(r["case"], r["provider"], r["metric"]): r for r in records}
    ratios = [
        {
            **r,
            "provider": "ours/trl",
            "metric": f"{r['metric']} ratio",
            "value": r["value"] / value[(r["case"], "trl", r["metric"])]["value"],
            "unit": "x",
        }
        for r in records
        if r["provider"] == "ours"
    ]
    return records + ratios


if __name__ == "__main__":
    main()
