"""What fits on which GPUs, before anything is allocated: per-GPU memory of a stage config, a verdict, the cheapest
changes that make it fit, and a step-time estimate. Arithmetic and the meta device only: runs in seconds anywhere.

    python -m distributed_pt.plan configs/examples/llama3.1-8b-lora-1gpu.yaml --gpus-per-node 1
    python -m distributed_pt.plan my_sft.yaml --nodes 2 --gpus-per-node 8 --gpu-memory 80GiB --json
    python -m distributed_pt.plan configs/examples/llama3.1-8b-longctx-sft-8gpu.yaml --longest   # at each SP size

The memory model and its calibration: `distributed_pt/engine/planner.py`.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from typing import Any

from distributed_pt.config import ConfigError, load_config
from distributed_pt.engine.fitting import length_key, longest_sequence, parallel_sizes, suggest
from distributed_pt.engine.planner import GiB, Hardware, make_plan, render


def parse_memory(text: str) -> float:
    """'80GiB', '80GB', '141 GiB', '80' (GiB) -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(GiB|GB|MiB|MB)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"expected e.g. 80GiB, 141GB or 80, got {text!r}")
    unit = (m.group(2) or "GiB").lower()
    return float(m.group(1)) * {"gib": GiB, "gb": 1e9, "mib": 2**20, "mb": 1e6}[unit]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a stage config (YAML)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, as for distributed_pt.train")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpu-memory", type=parse_memory, default=80 * GiB, help="per GPU, e.g. 80GiB (default)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 per GPU (H100 SXM: 989)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation the step time assumes")
    parser.add_argument("--json", action="store_true", help="print a machine-readable record instead")
    parser.add_argument("--longest", action="store_true", help="also the longest sequence that fits (data.max_length; "
                        "PPO/GRPO: max_new_tokens) at each sequence-parallel size")  # fmt: skip
    args = parser.parse_intermixed_args(argv)
    hw = Hardware(args.gpus_per_node, args.nodes, args.gpu_memory, args.peak_tflops, args.mfu)
    try:
        cfg = load_config(args.config, args.overrides)
        plan = make_plan(cfg, hw)
        if not plan.fits:
            plan.suggestions = suggest(cfg, hw, plan)
        longest = {k: longest_at(cfg, hw, k) for k in parallel_sizes(plan)} if args.longest else {}
    except ConfigError as e:
        sys.exit(f"error: {e}")
    if args.json:
        extra = {"longest": {"key": length_key(cfg), **longest}} if longest else {}
        print(json.dumps({"config": args.config, "overrides": args.overrides, **plan.record(), **extra}, indent=1))
        return
    print(render(plan, args.config))
    if longest:
        print(f"longest {length_key(cfg)} that fits, by deepspeed.sequence_parallel_size: "
              + ", ".join(f"{k}: {n:,}" if n else f"{k}: none" for k, n in longest.items()))  # fmt: skip


def longest_at(cfg: Any, hw: Hardware, sp: int) -> int:
    """`longest_sequence` with the config's sequence-parallel size set to `sp` (1 for the stages that cannot shard)."""
    changed = copy.deepcopy(cfg)
    changed.deepspeed.sequence_parallel_size = sp
    return longest_sequence(changed, hw)


if __name__ == "__main__":
    main()
