"""Programmatic rewards for the RL stages: "module.path:function" specs, called once per rollout batch, checked, and
combined by weight; a function that misbehaves stops every rank together.

A reward function has one signature:

    def my_reward(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
        return [float(c.strip() == row["answer"]) for c, row in zip(completions, rows)]

``prompts[i]`` is the prompt (a list of chat messages for a chat row), ``completions[i]`` the decoded completion and
``rows[i]`` the dataset row it came from (any column, e.g. "answer"). It returns one finite number per completion: an
int, a float or a bool (True = 1.0, so a checker's verdict can be returned as it is). None, a string, NaN or inf, an
exception or a list of the wrong length stops the run with a ``RewardError`` naming the spec, the step and the sample.
Point a stage at it with ``reward.functions: ["my_rewards:my_reward"]`` (importable from the project or PYTHONPATH)
and optionally ``reward.weights``. Bundled: ``distributed_pt.rl.rewards:exact_answer``, ``:format_reward`` and
``:length_penalty``.
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as torch_dist

from distributed_pt import dist
from distributed_pt.config import ConfigError
from distributed_pt.data.demo import solve
from distributed_pt.data.prompts import is_exact_match, prompt_and_reference
from distributed_pt.engine.loop import TrainingError

RewardFn = Callable[[list[Any], list[str], list[dict]], Sequence[float]]


class RewardError(TrainingError):
    """A reward function misbehaved; the message names its spec, the step and the offending sample."""


class RewardFunctions:
    """Reward functions with their weights. ``names``: each function's ``__name__``, made unique (``_2``, ``_3``)."""

    def __init__(self, specs: list[str], fns: list[RewardFn], weights: list[float]) -> None:
        self.specs, self.fns, self.weights = specs, fns, weights
        self.names: list[str] = []
        for spec, fn in zip(specs, fns, strict=True):
            base = name = getattr(fn, "__name__", spec.rpartition(":")[2])
            k = 1
            while name in self.names:  # f, f_2, f_3, ...
                k += 1
                name = f"{base}_{k}"
            self.names.append(name)

    def __len__(self) -> int:
        return len(self.fns)

    def __call__(
        self, prompts: list[Any], completions: list[str], rows: list[dict], step: int, collective: bool = True
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Score this rank's completions: ``compute``, then (``collective``, the default) one all-reduce of a failure
        flag, so that every rank must call it and a failure on any rank raises ``RewardError`` on all of them (the
        failing rank its own, the others "a reward function failed on another rank at step N (rank r: ...)").

        Returns:
            The weighted total, shape (N,) float32 on CPU, and each function's raw values {name: (N,) float32}.
        """
        try:
            result = self.compute(prompts, completions, rows, step)
        except RewardError as e:
            if collective:
                _raise_together(e, step)  # raises e, once the other ranks know
            raise
        if collective:
            _raise_together(None, step)  # raises if another rank failed
        return result

    def compute(
        self, prompts: list[Any], completions: list[str], rows: list[dict], step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This rank alone (no collective): as ``__call__``, raising ``RewardError`` here only."""
        n = len(completions)
        if len(prompts) != n or len(rows) != n:
            raise ValueError(f"{len(prompts)} prompts, {n} completions and {len(rows)} rows: they must match")
        total = torch.zeros(n, dtype=torch.float64)
        per_function = {}
        for spec, fn, weight, name in zip(self.specs, self.fns, self.weights, self.names, strict=True):
            values = _checked_call(spec, fn, prompts, completions, rows, step)
            per_function[name] = values.float()
            total += weight * values
        return total.float(), per_function


def load_reward_functions(functions: list[str], weights: list[float] | None = None) -> RewardFunctions:
    """Import each "module.path:function" spec (weights: None = all 1.0). Raises ConfigError naming the bad spec."""
    if weights is not None and len(weights) != len(functions):
        raise ConfigError(f"reward.weights has {len(weights)} values for {len(functions)} reward.functions")
    if weights is not None and not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"reward.weights must be finite numbers, got {weights}")
    fns = [_import(spec) for spec in functions]
    return RewardFunctions(list(functions), fns, [1.0] * len(fns) if weights is None else [float(w) for w in weights])


def _import(spec: str) -> RewardFn:
    module_name, _, attr = (part.strip() for part in spec.partition(":"))
    if not module_name or not attr or ":" in attr:
        raise ConfigError(f"reward.functions: {spec!r} must look like 'module.path:function'")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # a missing module, or one that fails while importing
        raise ConfigError(
            f"reward.functions: cannot import {module_name!r} for {spec!r} ({type(e).__name__}: {e}); "
            "it must be importable from the project or PYTHONPATH"
        ) from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"reward.functions: {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"reward.functions: {spec!r} is not callable (it is a {type(obj).__name__})")
    return obj


def _checked_call(
    spec: str, fn: RewardFn, prompts: list[Any], completions: list[str], rows: list[dict], step: int
) -> torch.Tensor:
    """Call one function and check it returned one finite number per completion: (N,) float64."""
    n, where = len(completions), f"reward function {spec!r} at step {step}"
    try:
        values = fn(prompts, completions, rows)
    except Exception as e:
        raise RewardError(f"{where} raised {type(e).__name__}: {e} (batch of {n} completions)") from e
    if hasattr(values, "tolist") and not isinstance(values, list | tuple):
        values = values.tolist()  # a tensor or numpy array (a 0-dim one gives a scalar: rejected below)
    if not isinstance(values, list | tuple):
        raise RewardError(f"{where} returned a {type(values).__name__}, not a list of {n} numbers")
    if len(values) != n:
        raise RewardError(f"{where} returned {len(values)} values for {n} completions (sample {min(len(values), n)})")
    for i, v in enumerate(values):
        if not isinstance(v, numbers.Real):
            problem = f"{v!r} ({type(v).__name__}), not a number,"
        elif not _finite(v):
            problem = repr(v) if len(repr(v)) <= 40 else repr(v)[:40] + "..."  # NaN, inf or an int beyond float range
        else:
            continue
        raise RewardError(f"{where} returned {problem} for sample {i} (completion {completions[i][:80]!r})")
    return torch.tensor([float(v) for v in values], dtype=torch.float64)


def _finite(v: numbers.Real) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond float range
        return False


def _raise_together(error: RewardError | None, step: int) -> None:
    """Collective: one flag per rank, summed; if any is set, every rank raises (the lowest failing rank's message is
    broadcast so that rank 0, which prints the error, can say what went wrong)."""
    flags = torch.zeros(dist.world_size())
    flags[dist.rank()] = float(error is not None)
    flags = dist.all_reduce_sum(flags)
    if not flags.any():
        return
    src = int(flags.nonzero()[0])
    message = str(error) if error is not None else None
    if torch_dist.is_available() and torch_dist.is_initialized():
        box = [message]
        torch_dist.broadcast_object_list(box, src=src)
        message = box[0]
    if error is not None:
        raise error
    detail = f" (rank {src}: {message})" if message else ""
    raise RewardError(f"a reward function failed on another rank at step {step}{detail}")


# ----------------------------------------------------------------------------------------------------------------------
# Bundled reward functions. Reference answer of a row: its "response" or "answer", or a chat row's last assistant
# message; a row without one whose prompt is a demo task gets the demo's solution (``distributed_pt.data.demo``).


def _reference(prompt: Any, row: dict) -> str | None:
    messages = row.get("messages")
    if isinstance(messages, list) and any(m.get("role") == "assistant" for m in messages):
        return prompt_and_reference(row)[1]
    if row.get("response", row.get("answer")) is not None:
        return str(row.get("response", row.get("answer")))
    text = prompt if isinstance(prompt, str) else " ".join(str(m.get("content", "")) for m in prompt)
    try:
        return solve(text)  # the demo checker: is_correct(prompt, c) == is_exact_match(c, solve(prompt))
    except ValueError:  # not a demo prompt
        return None


def exact_answer(prompts: list[Any], completions: list[str], rows: list[dict]) -> list[float]:
    """1.0 where the completion equals the reference answer after whitespace normalisation, else 0.0 (also with no
    reference). ``"  5 3\\n"`` for ``"5 3"`` -> 1.0; ``"5 3 ."`` -> 0.0."""
    return [float(is_exact_match(c, _reference(p, r))) for p, c, r in zip(prompts, completions, rows, strict=True)]


TRAILING_PUNCTUATION = ".,;:!?"


def format_reward(prompts: list[Any], completions: list[str], rows: list[dict]) -> list[float]:
    """1.0 for a well-formed demo answer, else 0.0: stripped of whitespace, the completion is non-empty and does not
    end with trailing punctuation (``TRAILING_PUNCTUATION``). The demo's SFT answers end with " ." half the time
    (``FULL_STOP_RATE``); its tasks' answers never do. ``"sun dog"`` -> 1.0; ``"sun dog ."`` -> 0.0; ``" "`` -> 0.0.
    It does not check the answer itself (``exact_answer`` does)."""
    return [float(bool(c.strip()) and c.strip()[-1] not in TRAILING_PUNCTUATION) for c in completions]


def make_length_penalty(per_token: float = 0.1, floor: float = -1.0) -> RewardFn:
    """A reward function: ``-per_token`` × (whitespace tokens beyond the reference answer's), clipped at ``floor``;
    0.0 within the reference's length or with no reference (reference as for ``exact_answer``)."""

    def length_penalty(prompts: list[Any], completions: list[str], rows: list[dict]) -> list[float]:
        out = []
        for p, c, r in zip(prompts, completions, rows, strict=True):
            ref = _reference(p, r)
            extra = 0 if ref is None else max(len(c.split()) - len(ref.split()), 0)
            out.append(max(-per_token * extra, floor) if extra else 0.0)
        return out

    return length_penalty


# -0.1 per whitespace token beyond the reference's length, at least -1.0: for "5 3", "5 3 ." -> -0.1, "5 3 . ." -> -0.2.
length_penalty = make_length_penalty()
