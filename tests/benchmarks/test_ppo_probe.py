"""ppo_probe: the AUC by hand, and a probe of the tests' SFT and RM models (per-task rows, rates in range)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import ppo_probe


def test_auc_by_hand():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.5, 0.2])
    correct = torch.tensor([True, False, True, False, False])
    # positives 0.9, 0.5 against negatives 0.1, 0.5, 0.2: 3 wins + 2 wins and one tie out of 6 pairs
    assert ppo_probe.auc(scores, correct) == pytest.approx((3 + 2.5) / 6)
    assert math.isnan(ppo_probe.auc(scores, torch.ones(5, dtype=torch.bool)))  # no wrong samples: undefined


def test_probe_of_the_test_models(tmp_path, sft_zero2_run, rm_zero2_run):
    out = tmp_path / "probe.json"
    ppo_probe.main([f"--policy={sft_zero2_run / 'final'}", f"--reward-model={rm_zero2_run / 'final'}",
                    "--prompts=40", "--samples=2", f"--out={out}"])  # fmt: skip
    table = json.loads(out.read_text())["table"]
    assert set(table) == {"add", "count", "reverse", "sort", "all"}
    assert sum(table[t]["n"] for t in ("add", "count", "reverse", "sort")) == table["all"]["n"] == 40
    for row in table.values():
        assert 0 <= row["greedy_em"] <= 1 and 0 <= row["sample_acc"] <= row["pass@2"] <= 1
        assert "rm_auc" in row
