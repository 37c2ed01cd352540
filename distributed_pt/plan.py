"""What fits on which GPUs, before anything is allocated: per-GPU memory of a stage config, a verdict, the cheapest
changes that make it fit, and a step-time estimate. Arithmetic and the meta device only: runs in seconds anywhere.

    python -m distributed_pt.plan configs/examples/llama3.1-8b-lora-1gpu.yaml --gpus-per-node 1
    python -m distributed_pt.plan my_sft.yaml --nodes 2 --gpus-per-node 8 --gpu-memory 80GiB --json

The memory model and its calibration: `distributed_pt/engine/planner.py`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from distributed_pt.config import ConfigError, load_config
from distributed_pt.engine.planner import GiB, Hardware, make_plan, render, suggest


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
    args = parser.parse_intermixed_args(argv)
    hw = Hardware(args.gpus_per_node, args.nodes, args.gpu_memory, args.peak_tflops, args.mfu)
    try:
        cfg = load_config(args.config, args.overrides)
        plan = make_plan(cfg, hw)
        if not plan.fits:
            plan.suggestions = suggest(cfg, hw, plan)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    if args.json:
        print(json.dumps({"config": args.config, "overrides": args.overrides, **plan.record()}, indent=1))
    else:
        print(render(plan, args.config))


if __name__ == "__main__":
    main()
