"""Held-out exact match: overall and per task."""

from __future__ import annotations

from distributed_pt.engine.generation import exact_match, exact_match_by_task


def test_exact_match_overall_and_per_task():
    answers = [
        ({"prompt": "add : 1 + 2 =", "answer": "3", "task": "add"}, " 3 "),
        ({"prompt": "add : 2 + 2 =", "answer": "4", "task": "add"}, "5"),
        ({"prompt": "sort : b a =", "answer": "a b", "task": "sort"}, "a  b"),
        ({"prompt": "p", "answer": "x"}, "x"),  # no task column: counted overall only
    ]
    metrics = exact_match_by_task(answers, ["add", "count", "sort"])
    assert metrics == {"eval/exact_match": 0.75, "eval/exact_match/add": 0.5, "eval/exact_match/sort": 1.0}
    assert exact_match(answers) == 0.75
