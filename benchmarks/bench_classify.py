"""Classifiers from a causal LM, three ways side by side: a head on frozen features, LoRA, full fine-tuning.

Every run is the real classify stage through the DeepSpeed launcher (configs/classify_tiny.yaml, the bundled routing
demo: 4 classes, 2000 training rows with 5% flipped labels, 400 clean eval rows), the same epochs and seed for each
mode, from two backbones: ``random`` (the config's random-init Llama) and ``sft`` (that Llama after an SFT run on the
demo tasks, trained here first: a "pretrained" backbone that has read such text). Measured per run: held-out accuracy
and macro-F1 (the final eval), trainable parameters, bytes stored per task (what a task needs beyond the shared
backbone and tokenizer: the head + classifier.json, the LoRA adapter with its head, or the whole model), peak memory
(CPU: peak RSS of the largest rank, mostly the runtime), seconds to train (the loop, plus the feature pass in feature
mode) and the launcher's wall time.

    python -m benchmarks.bench_classify --cpu          # 2 ranks, both backbones (~5 min on 2 cores)
    python -m benchmarks.bench_classify --smoke --out /tmp/bench     # seconds: one feature-mode run, 1 rank

Writes ``bench_classify_<cpu|smoke>.json`` (flat records: case = backbone, provider = mode) + ``.md`` + ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import make_record, save_results

BENCH = "bench_classify"
ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "classify_tiny.yaml"
MODES = ("feature", "lora", "full")
LR = {"feature": 1e-2, "lora": 3e-3, "full": 1e-3}  # the head alone takes a larger step; full fine-tuning the least
METRICS = (  # (metric, unit)
    ("accuracy", "fraction"), ("macro_f1", "fraction"), ("trainable_params", "count"), ("bytes_per_task", "bytes"),
    ("peak_mem", "GiB"), ("train_s", "s"), ("features_s", "s"), ("wall_s", "s"),
)  # fmt: skip
PRESETS = {
    "cpu": dict(world=2, epochs=4, sft_steps=300, backbones="random,sft", modes=",".join(MODES)),
    "smoke": dict(world=1, epochs=0, steps=2, sft_steps=0, backbones="random", modes="feature"),
}


def launch(config: Path | str, overrides: list[str], world: int, timeout_s: float = 900.0) -> tuple[float, str]:
    """One stage run through the DeepSpeed launcher on CPU: (wall seconds, output). Raises on a failed run."""
    from distributed_pt.dist import free_port

    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world), "--master_port",
           str(free_port()), "--module", "distributed_pt.train", str(config), *overrides]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu")
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(overrides[:2])}: exit {proc.returncode}\n{(proc.stdout + proc.stderr)[-3000:]}")
    return time.monotonic() - t0, proc.stdout


def common(out: Path) -> list[str]:
    return [f"output_dir={out}", "logging.wandb_mode=disabled", "logging.progress_bar=false",
            "checkpoint.save_every=0", "checkpoint.resume=none"]  # fmt: skip


def train_sft(work: Path, steps: int, world: int) -> Path:
    """The `sft` backbone: configs/sft_tiny.yaml (the same Llama as classify_tiny.yaml) for `steps` steps."""
    out = work / "sft"
    overrides = [*common(out), f"train.max_steps={steps}", "eval.num_generate=0", "train.eval_every=0"]
    launch(ROOT / "configs" / "sft_tiny.yaml", overrides, world)
    return out / "final"


def dir_bytes(path: Path, skip: tuple[str, ...] = ()) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.name.startswith(skip))


def task_bytes(final: Path, mode: str) -> int:
    """Bytes a task stores beyond the shared backbone and tokenizer."""
    if mode == "feature":
        return dir_bytes(final)  # head.safetensors + classifier.json
    if mode == "lora":
        return dir_bytes(final / "adapter") + (final / "classifier.json").stat().st_size
    return dir_bytes(final, skip=("tokenizer", "adapter"))  # model.safetensors + config.json + classifier.json


def classify_run(args: argparse.Namespace, work: Path, backbone: str, path: Path | None, mode: str) -> dict:
    """One classify run: its measurements, read from what the stage wrote."""
    out = work / f"{backbone}_{mode}"
    overrides = [f"classify.mode={mode}", *common(out), f"optim.lr={LR[mode]}", f"train.seed={args.seed}",
                 f"data.cache_dir={work / 'cache' / backbone}"]  # fmt: skip
    overrides += [f"train.epochs={args.epochs}"] if args.epochs else [f"train.max_steps={args.steps}"]
    if path is not None:
        overrides += [f"model.path={path}", "model.init_config=null"]
    wall, _ = launch(CONFIG, overrides, args.world)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    values = {k: v for m in metrics for k, v in m.items()}  # the last value of each key
    summary = json.loads((out / "summary.json").read_text())
    return {
        "accuracy": summary["after"]["eval/accuracy"],
        "macro_f1": summary["after"]["eval/macro_f1"],
        "trainable_params": summary["parameters"]["trainable"],
        "bytes_per_task": task_bytes(out / "final", mode),
        "peak_mem": summary["memory_gib"]["measured_peak"],
        "train_s": values["time/train_s"] + values["time/features_s"],
        "features_s": values["time/features_s"],
        "wall_s": wall,
        "steps": summary["steps"],
    }


def run_all(args: argparse.Namespace, work: Path) -> list[dict]:
    records = []
    for backbone in args.backbones.split(","):
        path = train_sft(work, args.sft_steps, args.world) if backbone == "sft" else None
        for mode in args.modes.split(","):
            result = classify_run(args, work, backbone, path, mode)
            print(f"{backbone:6s} {mode:7s} " + " ".join(f"{k}={v:.4g}" for k, v in result.items()), flush=True)
            case = {"backbone": backbone, "world": args.world, "steps": result["steps"]}
            records += [make_record(args.name, case, mode, m, result[m], unit) for m, unit in METRICS]
    return records


def side_by_side(md: Path, records: list[dict]) -> None:
    """Append the table to read: one row per backbone and mode, one column per metric."""
    val = {(r["backbone"], r["provider"], r["metric"]): r["value"] for r in records}
    rows = list(dict.fromkeys((r["backbone"], r["provider"]) for r in records))
    lines = ["", "## Side by side", "", "| backbone | mode | " + " | ".join(f"{m} ({u})" for m, u in METRICS) + " |",
             "|---|---|" + "---:|" * len(METRICS)]  # fmt: skip
    for b, mode in rows:
        cells = [val.get((b, mode, m), float("nan")) for m, _ in METRICS]
        lines.append(f"| {b} | {mode} | " + " | ".join(f"{c:.4g}" if c < 1e5 else f"{c:.3g}" for c in cells) + " |")
    settings = json.loads(records[0]["settings"])
    lines += ["", f"Settings: {settings}. Accuracy and macro-F1: the final eval on the 400 held-out rows; train_s "
              "includes features_s (the one feature pass; 0 on a cache hit); peak_mem: CPU peak RSS of the largest "
              "rank (the runtime dominates it on this tiny model)."]  # fmt: skip
    with md.open("a") as f:
        f.write("\n".join(lines) + "\n")


def plot(png: Path, records: list[dict]) -> None:
    """One panel per figure that matters, bars per mode, grouped by backbone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["backbone"] for r in records))
    modes = list(dict.fromkeys(r["provider"] for r in records))
    val = {(r["backbone"], r["provider"], r["metric"]): r["value"] for r in records}
    panels = [("accuracy", False), ("macro_f1", False), ("bytes_per_task", True), ("trainable_params", True),
              ("train_s", False)]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    width = 0.8 / len(modes)
    for ax, (metric, log) in zip(axes, panels, strict=True):
        for i, mode in enumerate(modes):
            xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(cases))]
            ax.bar(xs, [val.get((c, mode, metric), float("nan")) for c in cases], width, label=mode)
        ax.set_xticks(range(len(cases)), [f"{c} backbone" for c in cases], fontsize=8)
        ax.set_title(metric, fontsize=9)
        if log:
            ax.set_yscale("log")
        elif metric in ("accuracy", "macro_f1"):
            ax.set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    first = records[0]
    fig.suptitle(f"{first['bench']} — {first.get('device')} — {first.get('git_sha')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one feature-mode run of 2 steps on 1 rank")
    parser.add_argument("--cpu", action="store_true", help="the recorded preset (default)")
    parser.add_argument("--world", type=int)
    parser.add_argument("--epochs", type=int, help="epochs per classify run (0: --steps)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--sft-steps", type=int, help="steps of the sft backbone's SFT run")
    parser.add_argument("--backbones", help="comma list of random, sft")
    parser.add_argument("--modes", help="comma list of feature, lora, full")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work-dir", type=Path, help="run outputs (default: a temp dir, removed)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    preset = "smoke" if args.smoke else "cpu"
    for key, value in PRESETS[preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.name = f"{BENCH}_{preset}"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the records say cpu
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_classify_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        records = run_all(args, work)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "work_dir", "name")} | {"lr": LR}
    records = [r | {"preset": preset, "settings": json.dumps(settings, default=str)} for r in records]
    path = save_results(args.name, records, args.out)
    side_by_side(path.with_suffix(".md"), records)
    plot(path.with_suffix(".png"), records)
    print(path.with_suffix(".md").read_text())
    print(f"wrote {path}, {path.with_suffix('.md')}, {path.with_suffix('.png')} in {time.monotonic() - t0:.0f} s")
    return path


if __name__ == "__main__":
    main()
