"""Reward functions: loading specs, weights, each misbehaviour's error, the cross-rank failure path, the bundled
functions on demo prompts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distributed_pt import dist
from distributed_pt.config import ConfigError
from distributed_pt.data.demo import format_prompt, is_correct, solve
from distributed_pt.engine.loop import TrainingError
from distributed_pt.rl.rewards import (
    RewardError,
    RewardFunctions,
    exact_answer,
    format_reward,
    length_penalty,
    load_reward_functions,
    make_length_penalty,
)

ADD = format_prompt("add", [], ["3", "4", "+", "1", "9"])  # "add : 3 4 + 1 9 =" -> "5 3"
REVERSE = format_prompt("reverse", [], ["cat", "dog", "sun"])  # -> "sun dog cat"
COUNT = format_prompt("count", ["a"], ["b", "a", "c", "a"])  # -> "2"


def constant(value):
    def fn(prompts, completions, rows):
        return [value] * len(completions)

    return fn


def batch(n: int = 3):
    return ["p"] * n, ["c"] * n, [{}] * n


# ----------------------------------------------------------------------------------------------------------------------
# Loading


def test_load_bundled_specs_and_default_weights():
    fns = load_reward_functions(
        ["distributed_pt.rl.rewards:exact_answer", "distributed_pt.rl.rewards:format_reward"], None
    )
    assert fns.fns == [exact_answer, format_reward]
    assert fns.weights == [1.0, 1.0]
    assert fns.names == ["exact_answer", "format_reward"]
    assert len(load_reward_functions([], None)) == 0


def test_load_from_the_users_pythonpath(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(
        "def one(prompts, completions, rows):\n    return [1.0 for _ in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fns = load_reward_functions(["my_rewards_mod:one"], [0.5])
    total, per = fns(*batch(2), step=1)
    torch.testing.assert_close(total, torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(per["one"], torch.tensor([1.0, 1.0]))


@pytest.mark.parametrize(
    "spec, words",
    [
        ("distributed_pt.rl.rewards.exact_answer", "must look like 'module.path:function'"),
        (":exact_answer", "must look like"),
        ("distributed_pt.rl.rewards:", "must look like"),
        ("a:b:c", "must look like"),
        ("no_such_module_xyz:fn", "cannot import 'no_such_module_xyz'"),
        ("distributed_pt.rl.rewards:no_such_fn", "has no attribute 'no_such_fn'"),
        ("distributed_pt.rl.rewards:TRAILING_PUNCTUATION", "is not callable (it is a str)"),
    ],
)
def test_bad_spec_is_a_config_error_naming_it(spec, words):
    with pytest.raises(ConfigError) as e:
        load_reward_functions(["distributed_pt.rl.rewards:exact_answer", spec], None)
    assert repr(spec) in str(e.value) and words in str(e.value)


def test_module_failing_at_import_is_a_config_error(tmp_path, monkeypatch):
    (tmp_path / "broken_rewards_mod.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"'broken_rewards_mod:f'.*RuntimeError: no GPU here"):
        load_reward_functions(["broken_rewards_mod:f"], None)


@pytest.mark.parametrize("weights", [[1.0], [1.0, 2.0, 3.0]])
def test_weights_of_the_wrong_length(weights):
    specs = ["distributed_pt.rl.rewards:exact_answer", "distributed_pt.rl.rewards:format_reward"]
    with pytest.raises(ConfigError, match=rf"reward.weights has {len(weights)} values for 2 reward.functions"):
        load_reward_functions(specs, weights)


def test_non_finite_weight():
    with pytest.raises(ConfigError, match="reward.weights"):
        load_reward_functions(["distributed_pt.rl.rewards:exact_answer"], [math.nan])


# ----------------------------------------------------------------------------------------------------------------------
# Combining


def test_weights_combine_hand_computed():
    def a(prompts, completions, rows):
        return [1.0, 0.0, 2.0]

    def b(prompts, completions, rows):
        return [True, 3, -1.5]  # bools and ints count as numbers

    fns = RewardFunctions(["m:a", "m:b"], [a, b], [0.5, -2.0])
    total, per = fns(*batch(3), step=4)
    assert total.dtype == torch.float32 and total.shape == (3,)
    torch.testing.assert_close(total, torch.tensor([0.5 - 2.0, 0.0 - 6.0, 1.0 + 3.0]))
    torch.testing.assert_close(per["a"], torch.tensor([1.0, 0.0, 2.0]))
    torch.testing.assert_close(per["b"], torch.tensor([1.0, 3.0, -1.5]))


def test_tensor_and_array_results_are_accepted_and_names_made_unique():
    def f(prompts, completions, rows):
        return torch.tensor([1.0, 2.0])

    g = constant(0.25)
    g.__name__ = "f"
    h = make_length_penalty()  # __name__ "length_penalty"
    fns = RewardFunctions(["m:f", "n:f", "x:h", "y:h"], [f, g, h, lambda p, c, r: np.array([4.0, 5.0])], [1.0] * 4)
    total, per = fns(["p", "p"], ["a", "b"], [{}, {}], step=0)
    assert list(per) == ["f", "f_2", "length_penalty", "<lambda>"]
    torch.testing.assert_close(total, torch.tensor([5.25, 7.25]))


# ----------------------------------------------------------------------------------------------------------------------
# Misbehaviour: RewardError naming the spec, the step and the sample


def raises(prompts, completions, rows):
    raise KeyError("answer")


@pytest.mark.parametrize(
    "fn, words",
    [
        (raises, "raised KeyError: 'answer'"),
        (lambda p, c, r: [1.0, 1.0], "returned 2 values for 3 completions (sample 2)"),
        (lambda p, c, r: [1.0] * 4, "returned 4 values for 3 completions (sample 3)"),
        (lambda p, c, r: [1.0, 0.0, math.nan], "returned nan for sample 2"),
        (lambda p, c, r: [1.0, 0.0, -math.inf], "returned -inf for sample 2"),
        (lambda p, c, r: [1.0, 0.0, None], "returned None (NoneType), not a number, for sample 2"),
        (lambda p, c, r: [1.0, 0.0, "1.0"], "returned '1.0' (str), not a number, for sample 2"),
        (lambda p, c, r: [1.0, 0.0, 10**400], f"returned {10**39}... for sample 2"),
        (lambda p, c, r: 1.0, "returned a float, not a list of 3 numbers"),
        (lambda p, c, r: torch.tensor(1.0), "returned a float, not a list of 3 numbers"),
    ],
)
@pytest.mark.parametrize("collective", [True, False])
def test_misbehaviour_is_a_reward_error(fn, words, collective):
    fns = RewardFunctions(["distributed_pt.rl.rewards:exact_answer", "my.mod:bad"], [exact_answer, fn], [1.0, 1.0])
    with pytest.raises(RewardError) as e:
        fns(["p"] * 3, ["x", "y", "z"], [{"answer": "x"}] * 3, step=7, collective=collective)
    assert isinstance(e.value, TrainingError)
    assert "reward function 'my.mod:bad' at step 7" in str(e.value) and words in str(e.value)


def test_exception_is_chained():
    fns = RewardFunctions(["m:raises"], [raises], [1.0])
    with pytest.raises(RewardError) as e:
        fns(*batch(2), step=1)
    assert isinstance(e.value.__cause__, KeyError)


# ----------------------------------------------------------------------------------------------------------------------
# Across ranks (one process; the all-reduce is patched to bring another rank's failure flag)


def other_rank_failed(monkeypatch):
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce_sum", lambda t: t + torch.tensor([0.0, 1.0]))  # rank 1 failed


def test_rank_whose_functions_succeeded_raises_when_another_failed(monkeypatch):
    other_rank_failed(monkeypatch)
    fns = RewardFunctions(["m:one"], [constant(1.0)], [1.0])
    with pytest.raises(RewardError, match="a reward function failed on another rank at step 9"):
        fns(*batch(2), step=9)
    assert fns(*batch(2), step=9, collective=False)[0].tolist() == [1.0, 1.0]  # no collective, no cross-rank check


def test_failing_rank_raises_its_own_message_when_another_also_failed(monkeypatch):
    other_rank_failed(monkeypatch)
    fns = RewardFunctions(["m:raises"], [raises], [1.0])
    with pytest.raises(RewardError, match="reward function 'm:raises' at step 3 raised KeyError"):
        fns(*batch(2), step=3)


def test_no_failure_anywhere_passes(monkeypatch):
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce_sum", lambda t: t.clone())
    total, _ = RewardFunctions(["m:one"], [constant(1.0)], [2.0])(*batch(2), step=1)
    assert total.tolist() == [2.0, 2.0]


# ----------------------------------------------------------------------------------------------------------------------
# Bundled functions on demo prompts


def test_exact_answer_with_a_reference_column_and_without():
    assert solve(ADD) == "5 3" and solve(REVERSE) == "sun dog cat"
    prompts = [ADD, ADD, ADD, REVERSE, REVERSE, "what is love?", "what is love?"]
    completions = [" 5  3\n", "5 3 .", "", "sun dog cat", "cat dog sun", "baby", "dont"]
    rows = [{"answer": "5 3"}, {"answer": "5 3"}, {"answer": "5 3"}, {}, {}, {"response": "baby"}, {}]
    assert exact_answer(prompts, completions, rows) == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    # the fallback is the demo's checker
    assert [is_correct(p, c) for p, c in zip(prompts[3:5], completions[3:5], strict=True)] == [True, False]


def test_exact_answer_reads_chat_rows():
    row = {"messages": [{"role": "user", "content": COUNT}, {"role": "assistant", "content": "2"}]}
    prompt = row["messages"][:1]  # a chat prompt is a list of messages
    assert exact_answer([prompt, prompt], ["2", "3"], [row, row]) == [1.0, 0.0]
    no_answer = {"messages": [{"role": "user", "content": COUNT}]}  # a prompt row: the demo checker decides
    assert exact_answer([no_answer["messages"]] * 2, ["2", "2 ."], [no_answer] * 2) == [1.0, 0.0]


def test_format_reward():
    completions = ["sun dog cat", " 5 3\n", "sun dog cat .", "5 3.", "2!", "", "  \n", "a c d ,"]
    assert format_reward([REVERSE] * 8, completions, [{}] * 8) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_length_penalty():
    # reference "5 3" (2 tokens): -0.1 per token beyond, at least -1.0; none without a reference
    completions = ["5 3", "5", "", "5 3 .", "5 3 . . .", "5 3" + " x" * 20, "anything at all"]
    prompts, rows = [ADD] * 6 + ["not a demo prompt"], [{}] * 7
    expected = [0.0, 0.0, 0.0, -0.1, -0.3, -1.0, 0.0]
    assert length_penalty(prompts, completions, rows) == pytest.approx(expected)
    steep = make_length_penalty(per_token=0.5, floor=-0.75)
    assert steep([ADD] * 3, ["5 3 x", "5 3 x x", "5 3 x x x"], [{"answer": "5 3"}] * 3) == [-0.5, -0.75, -0.75]


def test_bundled_functions_together_through_specs():
    fns = load_reward_functions(
        [f"distributed_pt.rl.rewards:{name}" for name in ("exact_answer", "format_reward", "length_penalty")],
        [1.0, 0.5, 1.0],
    )
    total, per = fns([ADD] * 3, ["5 3", "5 3 .", "4 3"], [{"answer": "5 3"}] * 3, step=2)
    torch.testing.assert_close(per["exact_answer"], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(per["format_reward"], torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(per["length_penalty"], torch.tensor([0.0, -0.1, 0.0]))
    torch.testing.assert_close(total, torch.tensor([1.5, -0.1, 0.5]))


# ----------------------------------------------------------------------------------------------------------------------
# Two real ranks (gloo): rank 1's function fails, rank 0's succeeds; both raise, neither hangs.


def fails_on_boom(prompts, completions, rows):
    return [math.nan if c == "boom" else 1.0 for c in completions]


def _rank_main(rank: int, port: int, out) -> None:
    import torch.distributed as td

    td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    fns = RewardFunctions(["m:fails_on_boom"], [fails_on_boom], [1.0])
    try:
        ok = fns(["p"], ["fine"], [{}], step=1)[0].tolist()
        fns(["p", "p"], ["fine", "boom" if rank == 1 else "fine"], [{}, {}], step=5)
        out.put((rank, ok, "no error"))
    except RewardError as e:
        out.put((rank, ok, str(e)))
    finally:
        td.destroy_process_group()


def test_two_ranks_fail_together():
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    out, port = ctx.Queue(), dist.free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        rank, ok, message = out.get(timeout=60)
        results[rank] = (ok, message)
    for p in procs:
        p.join(timeout=30)
    own = "reward function 'm:fails_on_boom' at step 5 returned nan for sample 1 (completion 'boom')"
    assert results[1] == ([1.0], own)
    assert results[0] == ([1.0], f"a reward function failed on another rank at step 5 (rank 1: {own})")
