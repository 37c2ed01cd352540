"""Per-rank memory of one SFT step at long sequences, Ulysses sequence parallelism (SP) 1 vs 2 and tiled MLPs,
beside the planner.

    python -m benchmarks.bench_sequence --cpu                    # 2 lengths x SP 1, 2 x tiled MLP off, 4 (~2 min)
    python -m benchmarks.bench_sequence --cpu --seq 2048 --out /tmp/b   # a quick look

Each case runs in fresh processes (torchrun, SP of them: one sequence-parallel group) on a random-init Llama
(``MODEL``, fp32, sdpa, no gradient checkpointing, the demo tokenizer's small vocabulary so logits are negligible):
one forward and backward of a single sequence of ``--seq`` tokens through the stage's own path (``sequence.setup``,
``sequence.shard``, ``lm_loss``; ``model.tiled_mlp`` as ``--tiles``). Per rank it records

* ``saved_bytes``: the bytes autograd keeps for the backward (every tensor saved during the forward, counted once per
  storage, parameters left out) — the planner's "activations" term, measured exactly;
* ``peak_rss_delta``: the rise of the process's peak RSS over the step (what the step adds to the host's peak:
  the saved tensors plus transients such as the all-to-all buffers and the backward's gradients);
* ``planned_bytes``: `engine.planner.activations` for this rank's tokens (plus the logits term), and the ratios. The
  planner's term includes one layer's transients (the all-to-all buffers, one MLP tile's recompute), which
  ``saved_bytes`` does not; its per-token constants were fitted in bf16 on an H100 (it over-predicts here).

The figure that matters: per-rank saved bytes at SP 2 / SP 1 (ideal 0.5) and how close the planner is to each.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = "bench_sequence"
ROOT = Path(__file__).resolve().parents[1]
MODEL = ("{model_type: llama, hidden_size: 256, intermediate_size: 688, num_hidden_layers: 4, num_attention_heads: 4, "
         "num_key_value_heads: 2, max_position_embeddings: 65536}")  # fmt: skip


def worker(seq: int, sp: int, tiles: int, out: Path) -> None:
    """One step on this rank (run under torchrun with SP processes); rank 0 writes every rank's figures to `out`."""
    import torch

    from distributed_pt import dist
    from distributed_pt.config import load_config
    from distributed_pt.data.collate import Batch
    from distributed_pt.engine import sequence
    from distributed_pt.engine.planner import LOGIT_BYTES, activations, arch
    from distributed_pt.models.heads import Backbone, lm_loss
    from distributed_pt.models.loading import load_model, load_tokenizer

    dist.init_distributed()
    overrides = [f"model.init_config={MODEL}", "model.dtype=fp32", "model.attn_implementation=sdpa",
                 f"deepspeed.sequence_parallel_size={sp}", "train.micro_batch_size=1",
                 f"model.tiled_mlp={tiles}"]  # fmt: skip
    cfg = load_config(ROOT / "configs" / "sft_tiny.yaml", overrides)
    tokenizer = load_tokenizer(cfg.model)
    torch.manual_seed(0)
    model = load_model(cfg.model, tokenizer)
    sequence.setup(model, cfg)
    net = Backbone(model).train()
    ids = torch.randint(3, len(tokenizer), (1, seq))
    batch = Batch(ids, torch.ones_like(ids), ids.clone())
    if sp > 1:
        batch = sequence.shard(batch, sp, dist.rank(), tokenizer.pad_token_id)
    batch = Batch(batch.input_ids, None, batch.labels, batch.position_ids, shifted=batch.shifted)  # causal, no mask

    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = lm_loss(net, batch, fused=False, reduction="sum")
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    a = arch(cfg.model, cfg.lora, sp)
    tokens = batch.input_ids.numel()
    planned = activations(a, tokens, False, 4, sp, tiles) + LOGIT_BYTES[0] * tokens * a.vocab * 2  # fp32: twice bf16's
    mine = {"rank": dist.rank(), "tokens": tokens, "saved_bytes": sum(saved.values()),
            "peak_rss_delta": peak - before, "planned_bytes": planned, "loss": loss.item()}  # fmt: skip
    ranks = dist.all_gather_object(mine)
    if dist.is_main():
        out.write_text(json.dumps(ranks))
    dist.destroy()


def run_case(seq: int, sp: int, tiles: int, work: Path) -> list[dict]:
    out = work / f"seq{seq}_sp{sp}_tiles{tiles}.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // sp)))
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(sp), "--master_port",
           str(_free_port()), "-m", "benchmarks.bench_sequence", "--worker", "--seq", str(seq), "--sp", str(sp),
           "--tiles", str(tiles), "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"seq {seq} sp {sp} tiles {tiles} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def _free_port() -> int:
    from distributed_pt.dist import free_port

    return free_port()


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="lengths 8192 and 16384, SP 1 and 2 (CPU, ~2 min)")
    parser.add_argument("--seq", type=int, nargs="*", help="sequence lengths (default 8192 16384)")
    parser.add_argument("--sp", type=int, nargs="*", default=[1, 2], help="sequence-parallel sizes (1 2)")
    parser.add_argument("--tiles", type=int, nargs="*", default=[0, 4], help="model.tiled_mlp values (0 4)")
    parser.add_argument("--out", default="benchmarks/results", help="results folder")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.seq[0], args.sp[0], args.tiles[0], Path(args.out))
        return None
    from benchmarks.harness import make_record, save_results

    records = []
    with tempfile.TemporaryDirectory() as work:
        for seq in args.seq or [8192, 16384]:
            for sp, tiles in ((sp, tiles) for sp in args.sp for tiles in args.tiles):
                ranks = run_case(seq, sp, tiles, Path(work))
                worst = max(ranks, key=lambda r: r["saved_bytes"])
                case = {"seq": seq, "sp": sp, "tiled_mlp": tiles}
                for metric in ("saved_bytes", "peak_rss_delta", "planned_bytes"):
                    records.append(make_record(BENCH + "_cpu", case, "ours", metric, worst[metric] / 2**30, "GiB"))
                ratio = worst["planned_bytes"] / worst["saved_bytes"]
                records.append(make_record(BENCH + "_cpu", case, "ours", "planned/saved", ratio, "x"))
                gib = {k: worst[k] / 2**30 for k in ("saved_bytes", "peak_rss_delta", "planned_bytes")}
                print(f"seq {seq} sp {sp} tiled_mlp {tiles}: per rank saved {gib['saved_bytes']:.3f} GiB, peak RSS "
                      f"+{gib['peak_rss_delta']:.3f} GiB, planned {gib['planned_bytes']:.3f} GiB (x{ratio:.2f}); "
                      f"loss {sum(r['loss'] for r in ranks):.2f}", flush=True)  # fmt: skip
    return save_results(BENCH + "_cpu", records, args.out)


if __name__ == "__main__":
    main()
