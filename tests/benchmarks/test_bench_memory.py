"""bench_memory: the ZeRO formula, the per-rank model-state accounting, not-fitting cases, and the rendered views."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from benchmarks import bench_memory as bm
from benchmarks import memory_case
from benchmarks.harness import render
from benchmarks.memory_case import is_oom
from benchmarks.zero_accounting import zero_model_state_bytes

# The "micro" preset by hand: embeddings 128x16, untied head 128x16, q/o 16x16, k/v 16x8 (1 KV head of 8),
# gate/up/down 16x32, two layer norms and the final norm of 16.
MICRO_PARAMS = 128 * 16 * 2 + 16 * 16 * 2 + 16 * 8 * 2 + 3 * 16 * 32 + 3 * 16


def test_zero_formula_reproduces_the_papers_example():
    # ZeRO paper, Figure 1: Psi = 7.5B, N = 64, K = 12 → 120 GB, 31.4 GB, 16.6 GB, 1.9 GB.
    gb = [zero_model_state_bytes(7.5e9, stage, 64)["total"] / 1e9 for stage in (0, 1, 2, 3)]
    assert gb == pytest.approx([120.0, 31.40625, 16.640625, 1.875])


def test_zero_formula_terms_by_hand():
    psi, n = 1000, 4
    assert zero_model_state_bytes(psi, 0, n) == {"params": 2000, "grads": 2000, "optimizer": 12000, "total": 16000}
    assert zero_model_state_bytes(psi, 1, n)["total"] == 4000 + 12000 / 4
    assert zero_model_state_bytes(psi, 2, n) == {"params": 2000, "grads": 500, "optimizer": 3000, "total": 5500}
    assert zero_model_state_bytes(psi, 3, n)["total"] == 16000 / 4
    # LoRA: 1000 frozen-or-not weights, 10 trainable; frozen weights hold only their 2 bytes.
    assert zero_model_state_bytes(psi, 2, n, n_trainable=10)["total"] == 2000 + 14 * 10 / 4
    assert zero_model_state_bytes(psi, 3, 1, n_trainable=10)["total"] == 2000 + 14 * 10
    # fp32: 4 + 4 + 8 bytes (no master copy).
    assert zero_model_state_bytes(psi, 1, 2, dtype="fp32") == {
        "params": 4000, "grads": 4000, "optimizer": 4000, "total": 12000
    }  # fmt: skip


def test_model_state_accounting_of_one_rank_equals_the_hand_count():
    """ZeRO-2, one rank: bf16 weights and grads (2 + 2 bytes), fp32 master and two fp32 moments (4 + 8 bytes)."""
    stage, step_scalars = 2, 2  # Adam's step: one fp32 scalar per flat group (decay, no decay)
    case = bm.Case("micro", seq=32, micro_batch=1, zero=stage, offload=False, ckpt=False, world=1, mode="full")
    (res,) = bm.launch(case, steps=1, mem_cap_gib=None, timeout_s=180, cpu=True)
    assert res["status"] == "ok", res
    assert res["n_params"] == res["n_trainable"] == MICRO_PARAMS == 6448
    measured = {k: sum(v.values()) for k, v in res["measured"].items()}
    psi = MICRO_PARAMS
    assert measured == {"params": 2 * psi, "grads": 2 * psi, "master": 4 * psi, "moments": 8 * psi + 4 * step_scalars}
    assert res["predicted"]["total"] == 16 * psi


def test_a_case_that_does_not_fit_is_recorded_and_the_sweep_goes_on(tmp_path):
    # tiny full fine-tuning needs ~64 MiB of model state, micro ~0.1 MiB: a 32 MiB cap stops the first only.
    plan = [
        (bm.Case("tiny", 32, 1, 0, False, False, 1, "full"), None),
        (bm.Case("micro", 32, 1, 0, False, False, 1, "full"), None),
        (bm.Case("micro", 32, 1, 3, True, False, 1, "full"), "a reason to skip"),
    ]
    records = bm.sweep(
        plan, bench="bench_memory_test", steps=1, mem_cap_gib=1 / 32, case_timeout_s=180, budget_s=600, cpu=True
    )
    fit = {(r["size"], r["zero"]): r for r in records if r["metric"] == "fit"}
    assert fit[("tiny", 0)]["value"] == 0.0 and fit[("tiny", 0)]["status"] == "oom"
    assert "memory cap" in fit[("tiny", 0)]["note"]
    assert fit[("micro", 0)]["value"] == 1.0
    assert fit[("micro", 3)]["status"] == "skipped" and fit[("micro", 3)]["note"] == "a reason to skip"
    predicted = next(r for r in records if r["metric"] == "predicted" and r["size"] == "tiny")
    assert predicted["value"] > 32  # MiB: the prediction is kept for the case that did not fit


def test_an_out_of_memory_error_inside_a_rank_becomes_a_result(monkeypatch):
    def boom(case, steps, cap, out):
        out["n_params"] = 1
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(memory_case, "_measure", boom)
    case = bm.Case("micro", 32, 1, 2, False, False, 1, "full")
    res = bm.run_child({"case": dataclasses.asdict(case), "steps": 1})
    assert res["status"] == "oom" and res["n_params"] == 1 and "Tried to allocate" in res["note"]
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB"))
    assert not is_oom(ValueError("out of memory"))


def test_harness_renders_the_table_plot_and_notes(tmp_path):
    ok = {"status": "ok", "n_params": 6448, "n_trainable": 6448, "model_state": 103176.0, "step_s": 0.01,
          "tokens_per_s": 3200.0, "predicted": zero_model_state_bytes(6448, 2, 1),
          "breakdown": {"params": {"cpu": 12896}}, "per_rank_model_state": [103176.0]}  # fmt: skip
    case = bm.Case("micro", 32, 1, 2, False, False, 1, "full")
    records = bm.records_for(case, ok, "bench_memory_test", cuda=False)
    records += bm.records_for(bm.Case("micro", 32, 1, 2, False, False, 1, "lora"), {"status": "oom", "note": "x"},
                              "bench_memory_test", cuda=False)  # fmt: skip
    path = tmp_path / "bench_memory_test.json"
    path.write_text(json.dumps(records))
    md, png = render(path)
    bm.write_notes(md, records)
    text = md.read_text()
    assert "| size=micro,seq=32,mb=1,zero=2,offload=off,ckpt=off,world=1 |" in text
    assert "full model_state (MiB)" in text and "lora fit (1=fits)" in text
    assert "lora: oom: x" in text  # the reason it did not fit
    row = next(line for line in text.splitlines() if line.startswith("| size=micro"))
    # columns: each metric for full then lora: model state, predicted, ratio (lora did not fit: n/a)
    assert row.split(" | ")[1:6] == ["0.0984", "n/a", "0.0984", "n/a", "1"]
    assert png.stat().st_size > 1000


# LoRA r=16 on the micro preset's 7 projections: r * (in + out) each; q/o 16→16, k/v 16→8, gate/up 16→32, down 32→16.
MICRO_LORA = 16 * ((16 + 16) * 2 + (16 + 8) * 2 + (16 + 32) * 3)


def test_peft_mode_trains_the_same_adapters_as_ours_through_the_engine():
    """peft and lora at micro, ZeRO-2, checkpointing on: same trainable count, same model state, peer ratios."""
    plan = [(bm.Case("micro", 32, 1, 2, False, True, 1, mode), None) for mode in ("lora", "peft")]
    records = bm.sweep(
        plan, bench="bench_memory_test", steps=1, mem_cap_gib=None, case_timeout_s=180, budget_s=600, cpu=True
    )
    state = {r["provider"]: r for r in records if r["metric"] == "model_state"}
    assert state["peft"]["status"] == "ok", state["peft"]
    assert state["peft"]["n_trainable"] == state["lora"]["n_trainable"] == MICRO_LORA == 4096
    assert state["peft"]["n_params"] == state["lora"]["n_params"] == MICRO_PARAMS + MICRO_LORA
    assert state["peft"]["value"] > 0
    assert state["peft"]["value"] == state["lora"]["value"]  # bf16 weights and adapters, fp32 Adam state: same bytes
    lines = bm.peer_ratios(records)
    assert "| lora | n/a | " in next(line for line in lines if "| lora |" in line)  # no full in this run
    assert any("model_state ÷ peft" in line for line in lines)


def test_peft_model_has_peft_layers_the_same_start_and_gradients_under_checkpointing():
    """PEFT's lora.Linear layers stay in place inside the HF model that Backbone wraps; with the same seed the model
    starts where ours does (B = 0), and every adapter B gets a gradient through (non-reentrant) checkpointing."""
    from peft.tuners.lora import Linear as PeftLoraLinear

    from distributed_pt.data.collate import Batch
    from distributed_pt.engine.metrics import flops_per_token
    from distributed_pt.models.heads import Backbone, lm_loss

    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :8] = -100
    batch = Batch(ids, torch.ones_like(ids), labels)
    losses, flops = {}, {}
    for mode in ("lora", "peft"):
        torch.manual_seed(0)
        case = bm.Case("micro", 32, 2, 2, False, True, 1, mode, "fp32")
        model, fused = memory_case._build(case, torch.device("cpu"))
        assert not fused and any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        loss = lm_loss(Backbone(model).train(), batch, fused)
        loss.backward()
        losses[mode] = loss.item()
        flops[mode] = flops_per_token(memory_case._build(case, torch.device("meta"))[0], case.seq)
    layers = [m for m in model.modules() if isinstance(m, PeftLoraLinear)]
    assert len(layers) == 7
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert all(m.lora_B["default"].weight.grad.abs().sum() > 0 for m in layers)
    assert losses["peft"] == pytest.approx(losses["lora"], abs=1e-6)
    assert flops["peft"] == flops["lora"]  # MFU counts the same matmuls
