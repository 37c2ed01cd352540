"""Ulysses sequence parallelism: the SFT, DPO and RM stages on 2 ranks with sequence_parallel_size 2 train exactly as
on 1 rank (same batches, fp32): every step's loss (and the eval loss) agree; shards carry shifted targets; bad
settings are errors naming the key."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from distributed_pt.config import load_config
from distributed_pt.data.collate import Batch
from distributed_pt.engine.sequence import Shard, setup, shard, split, within_samples
from distributed_pt.models.heads import shift_labels
from tests.conftest import DEMO, RM_CONFIG, ROOT, TINY_SFT, read_metrics, run_launcher

CONFIG = ROOT / "configs" / "sft_tiny.yaml"
IGNORE = -100


def test_shards_cover_the_sequence_with_shifted_targets():
    ids = torch.arange(1, 8).view(1, 7)  # 7 tokens: padded to 8 for 2 shards
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4, 5, 6, 7]])
    batch = Batch(ids, torch.ones_like(ids), labels)
    a, b = shard(batch, 2, 0, pad_id=0), shard(batch, 2, 1, pad_id=0)
    assert a.input_ids.tolist() == [[1, 2, 3, 4]] and b.input_ids.tolist() == [[5, 6, 7, 0]]
    assert a.position_ids.tolist() == [[0, 1, 2, 3]] and b.position_ids.tolist() == [[4, 5, 6, 7]]
    # position 3 (token 4, shard 0's last) predicts token 5, the first of shard 1
    assert torch.cat([a.labels, b.labels], 1).tolist() == [shift_labels(labels).tolist()[0] + [IGNORE]]
    assert a.shifted and b.shifted and b.attention_mask.tolist() == [[1, 1, 1, 0]]
    # any per-position tensor, shifted or not, is cut the same way
    assert [split(ids[:, 1:], 2, r, 0, length=7).tolist() for r in (0, 1)] == [[[2, 3, 4, 5]], [[6, 7, 0, 0]]]
    assert Shard(2, 1)(ids[:, 1:].float(), -1.0).tolist() == [[6.0, 7.0, -1.0, -1.0]]  # per-position values
    assert Shard(1, 0)(ids) is ids and Shard(1, 0).reduce is None
    assert [split(ids[:, :6], 3, r, -1).tolist() for r in (0, 1, 2)] == [[[1, 2]], [[3, 4]], [[5, 6]]]
    # packed rows keep their own position ids (restarting per sample); the added column starts a segment of its own
    packed = replace(batch, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3]]))
    assert [shard(packed, 2, r, 0).position_ids.tolist() for r in (0, 1)] == [[[0, 1, 2, 0]], [[1, 2, 3, 0]]]


def test_sdpa_on_packed_rows_attends_within_samples():
    seen = {}
    core = within_samples(lambda module, q, k, v, mask, **kw: seen.setdefault("mask", mask))
    core(None, None, None, None, None, position_ids=torch.tensor([[0, 1, 2, 0, 1, 0]]))
    blocks = torch.block_diag(torch.ones(3, 3), torch.ones(2, 2), torch.ones(1, 1)).tril().bool()
    assert torch.equal(seen["mask"], blocks[None, None])


@pytest.mark.parametrize(
    "override, message",
    [
        ("deepspeed.sequence_parallel_size=3", "must divide the attention heads"),
        ("model.dtype=fp32", "must divide the world size"),  # one process, 2 shards
    ],
)
def test_bad_settings_name_the_key(override, message):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = load_config(CONFIG, ["deepspeed.sequence_parallel_size=2", override])
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=50))  # fmt: skip
    model.config._attn_implementation = "sdpa"
    with pytest.raises(Exception, match=message) as err:
        setup(model, cfg)
    assert "deepspeed.sequence_parallel_size" in str(err.value)
    model.config._attn_implementation = "flex_attention"  # DeepSpeed's flex path rebuilds a plain causal mask
    with pytest.raises(Exception, match="packs rows"):
        setup(model, load_config(CONFIG, ["deepspeed.sequence_parallel_size=2"]), packing=True)


STEPS = ["train.max_steps=4", "train.eval_every=4", "eval.num_generate=0", "checkpoint.save_every=0",
         "optim.warmup_steps=0", "data.max_length=48"]  # fmt: skip


def _same_steps(one, two, steps: int) -> None:
    """Every step's loss and gradient norm (before clipping: a gradient scaled by a constant would hide in Adam's
    normalisation) equal."""
    a, b = ({m["step"]: m for m in read_metrics(d) if "loss" in m} for d in (one, two))
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for step in a:
        for key in ("loss", "grad_norm"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5), (step, key, a, b)
    assert len({round(m["loss"], 6) for m in a.values()}) > 1  # the steps changed the model


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [["deepspeed.zero_stage=3", "lora.enabled=true", "optim.lr=1e-2"], ["data.packing=true", "data.max_length=96"]],
    ids=["zero3-lora", "packed"],  # ZeRO-0, ZeRO-2 and full ZeRO-3 pass too (checked by hand: ~1.5 min of suite each)
)
def test_two_shards_train_exactly_as_one_rank(tmp_path, extra):
    one, two = tmp_path / "sp1", tmp_path / "sp2"
    run_launcher(CONFIG, [*TINY_SFT, *STEPS, *extra, f"output_dir={one}"], nproc=1)
    run_launcher(CONFIG, [*TINY_SFT, *STEPS, *extra, f"output_dir={two}", "deepspeed.sequence_parallel_size=2"])
    _same_steps(one, two, 4)
    eval_a, eval_b = ([m for m in read_metrics(d) if "eval/loss" in m][-1] for d in (one, two))
    assert eval_b["eval/loss"] == pytest.approx(eval_a["eval/loss"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["dpo", "rm"])
def test_dpo_and_rm_train_exactly_as_one_rank(tmp_path, sft_zero2_run, stage):
    """DPO's sequence log-probs (policy on shards, the frozen reference on whole sequences) and the reward model's
    last-token scores are assembled over the shards: the same losses as one rank."""
    config = ROOT / "configs" / f"{stage}_tiny.yaml" if stage == "dpo" else RM_CONFIG
    common = [
        f"model.path={sft_zero2_run / 'final'}", f"data.train_files=[{DEMO / 'pref_train.jsonl'}]",
        f"data.eval_files=[{DEMO / 'pref_eval.jsonl'}]", "train.max_steps=3", "train.micro_batch_size=8",
        "train.log_every=1", "train.eval_every=0", "checkpoint.save_every=0", "checkpoint.export_hf=false",
        "optim.lr=2e-3", "optim.warmup_steps=0", "deepspeed.zero_stage=2", "logging.wandb_mode=disabled",
        "logging.progress_bar=false", *(["eval.num_generate=0"] if stage == "dpo" else []),
    ]  # fmt: skip
    one, two = tmp_path / "sp1", tmp_path / "sp2"
    run_launcher(config, [*common, f"output_dir={one}"], nproc=1)
    run_launcher(config, [*common, f"output_dir={two}", "deepspeed.sequence_parallel_size=2"])
    _same_steps(one, two, 3)


@pytest.mark.parametrize("mode", ["", "packed"])
def test_shards_equal_whole_sequences(mode):
    """2 ranks (torchrun): the GRPO objective's loss, statistics and summed gradients from each rank's shard equal
    those of whole sequences, for token/sequence/sequence_token ratios, grpo/dr_grpo/dapo aggregation and both
    advantage shapes; PPO's policy loss (importance-weighted) and value loss likewise; a Qwen2 model too; `gather`
    joins uneven rows. `packed`: packed rows' log-probs, gradients and rewards (sp_update_worker.py)."""
    import subprocess
    import sys

    from tests.conftest import env, free_port

    worker = ROOT / "tests" / "distributed_pt" / "engine" / "sp_update_worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(worker), str(ROOT / "configs" / "grpo_tiny.yaml"), *([mode] if mode else [])]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "rank 0: ok" in proc.stdout and "rank 1: ok" in proc.stdout


@pytest.mark.slow
def test_resume_under_sequence_parallelism_is_exact(tmp_path):
    """SP 2 on 2 ranks: 2 steps, stop, resume for steps 3-4 equals 4 steps uninterrupted (losses, gradient norms)."""
    base = [*TINY_SFT, *STEPS, "deepspeed.sequence_parallel_size=2", "optim.scheduler=constant",
            "checkpoint.save_every=2"]  # fmt: skip
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_launcher(CONFIG, [*base, f"output_dir={whole}"])
    run_launcher(CONFIG, [*base, f"output_dir={split}", "train.max_steps=2"])
    proc = run_launcher(CONFIG, [*base, f"output_dir={split}"])
    assert "resumed from" in proc.stdout and "step_2" in proc.stdout
    a, b = ({m["step"]: m for m in read_metrics(d) if "loss" in m} for d in (whole, split))
    for step in (3, 4):
        assert (b[step]["loss"], b[step]["grad_norm"]) == (a[step]["loss"], a[step]["grad_norm"]), (step, a, b)
