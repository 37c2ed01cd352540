"""Entry point for every stage: the config's `stage` key picks the recipe.

deepspeed --num_gpus 8 --module distributed_pt.train configs/sft_tiny.yaml [key.sub=value ...]
python -m distributed_pt.train configs/sft_tiny.yaml [key.sub=value ...]
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys


def _offline_defaults() -> None:
    # Nothing is downloaded at run time; datasets would otherwise make a DNS lookup per load.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def _keep_freed_memory() -> None:
    """Off GPU, tensors live in glibc's heap, which by default may hand freed blocks back to the OS: every step's new
    gradients are then page-faulted in afresh (a 25M-parameter model's backward on CPU: 11k faults a step, ~44 MiB;
    TRL's process happened to keep them; +3.4% tokens/s without them). Keep freed memory in the process instead:
    blocks up to 32 MiB from the heap, its free top returned only past 1 GiB. A speed-for-memory trade where shapes
    vary between steps, since such blocks fragment the heap: a 25M model's GRPO run peaks at 2.3-2.8 GiB RSS (SFT: no
    change); with `MALLOC_MMAP_THRESHOLD_=4194304` at 1.85 GiB, its updates then 40% slower (4.6 vs 3.1-3.3 s) and its
    generation 25%, faulting their tensors in afresh. Left alone on a GPU, where the CUDA allocator caches, and when
    the user set glibc's MALLOC_* variables (that one, say) or preloads another allocator."""
    import ctypes

    import torch

    if torch.cuda.is_available() or "LD_PRELOAD" in os.environ or any(k.startswith("MALLOC_") for k in os.environ):
        return
    if not sys.platform.startswith("linux"):
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the C library the interpreter runs on
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest
        mallopt(M_TRIM_THRESHOLD, 1 << 30)


def _epilog() -> str:
    """The stages (from the one registry), each with its config sections and a bundled example."""
    import dataclasses

    from distributed_pt.config import STAGES

    lines = ["stages (a config's `stage:` key), their config sections and an example:"]
    for name, stage in STAGES.items():
        sections = [f.name for f in dataclasses.fields(stage.config) if f.name not in ("stage", "output_dir")]
        lines.append(f"  {name:5s} {', '.join(sections)}")
        lines.append(f"        deepspeed --num_gpus 8 --module distributed_pt.train {stage.example} [key=value ...]")
    lines.append("Every key and its meaning: README.md (Running a stage); types, defaults: distributed_pt/config.py.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="distributed_pt.train",
        description=__doc__.splitlines()[0],
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="stage config YAML (configs/sft_*.yaml, ...)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 lora.enabled=true")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # added by `deepspeed`
    args = parser.parse_args(argv)
    _offline_defaults()
    _keep_freed_memory()

    from distributed_pt.checkpoint import CheckpointError
    from distributed_pt.config import STAGES, ConfigError, load_config
    from distributed_pt.data.io import DataError

    try:
        cfg = load_config(args.config, args.overrides)
        importlib.import_module(STAGES[cfg.stage].recipe).main(cfg)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        from distributed_pt import dist

        dist.destroy(barrier=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
