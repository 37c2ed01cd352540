"""The bundled demo: a synthetic dataset of checkable tasks, and a word-level tokenizer built offline from it.

    python -m distributed_pt.data.demo --out distributed_pt/assets/demo

Every prompt names its task and ends with ``=``; the answer is a few space-separated tokens:

    reverse : cat dog sun =      ->  sun dog cat
    sort : d a c =               ->  a c d
    add : 3 4 + 1 9 =            ->  5 3
    count a : b a c a =          ->  2

The prompt alone determines the answer, so ``is_correct(prompt, response)`` checks any response with no lookup table:
SFT learns the tasks, reward modelling learns correct vs wrong answers of several kinds (``wrong_answers``) and of the
SFT model's own samples, and PPO optimises the reward model (``FULL_STOP_RATE`` says what it can fix). Digits are
single tokens and words are whole tokens, so a random-init Llama with a hidden size of 128 learns the tasks on a CPU
in minutes. Generation is deterministic for a seed: the shipped files are reproducible.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from distributed_pt.config import DEMO_DIR
from distributed_pt.data.prompts import is_exact_match, normalize

WORDS = (
    "cat", "dog", "sun", "tree", "fish", "bird", "book", "cup", "hat", "car", "moon", "star",
    "milk", "rain", "door", "key", "box", "pen", "egg", "leaf", "ship", "frog", "lamp", "rose",
)  # fmt: skip
LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")
DIGITS = tuple("0123456789")
COUNT_LETTERS = tuple("abcd")  # few letters, so that counts 0-4 are all common

# Like real demonstration data, the SFT training answers are not consistent: half end with a full stop, which the
# prompts' answers never have (exact match counts it wrong). SFT imitates the habit, so the SFT model ends about half
# of its answers with one; the comparisons of its own samples (``sample_pairs``) prefer the bare answer, the reward
# model learns that, and PPO removes the habit: the part of InstructGPT that a tiny reward model can verify. The eval
# files, preference pairs and prompt files hold bare answers only.
FULL_STOP_RATE = 0.5

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
# Role markers of the framework's default chat template: whole tokens, never split, dropped by skip_special_tokens.
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SYSTEM_PROMPTS = ("answer with the result only .", "you solve small tasks . reply with the answer .")

FILES = (
    "sft_train.jsonl",
    "sft_eval.jsonl",
    "pref_train.jsonl",
    "pref_eval.jsonl",
    "prompts_train.jsonl",
    "prompts_eval.jsonl",
    "chat_sample.jsonl",
)


def _spaced(n: int) -> list[str]:
    return list(str(n))  # 53 -> ["5", "3"]: one token per digit


def _number(digits: list[str]) -> int:
    return int("".join(digits))


# ----------------------------------------------------------------------------------------------------------------------
# Tasks. A task draws its arguments, solves them, and proposes task-specific wrong answers (kind -> tokens).


@dataclass(frozen=True)
class Task:
    name: str
    draw: Callable[[random.Random], tuple[list[str], list[str]]]  # rng -> (params, args)
    solve: Callable[[list[str], list[str]], list[str]]  # (params, args) -> answer tokens
    near_misses: Callable[[list[str], list[str], list[str]], dict[str, list[str]]]  # (params, args, answer) -> kinds
    alphabet: tuple[str, ...]  # what a "replace" wrong answer may substitute

    def make(self, rng: random.Random) -> tuple[str, str]:
        """Draw one example: ``(prompt, answer)``."""
        params, args = self.draw(rng)
        return format_prompt(self.name, params, args), " ".join(self.solve(params, args))


def _draw_words(rng: random.Random) -> tuple[list[str], list[str]]:
    return [], rng.choices(WORDS, k=rng.randint(2, 5))


def _draw_letters(rng: random.Random) -> tuple[list[str], list[str]]:
    return [], rng.sample(LETTERS, k=rng.randint(2, 5))


def _draw_add(rng: random.Random) -> tuple[list[str], list[str]]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return [], [*_spaced(a), "+", *_spaced(b)]


def _draw_count(rng: random.Random) -> tuple[list[str], list[str]]:
    return [rng.choice(COUNT_LETTERS)], rng.choices(COUNT_LETTERS, k=rng.randint(3, 7))


def _operands(args: list[str]) -> tuple[int, int]:
    plus = args.index("+")
    return _number(args[:plus]), _number(args[plus + 1 :])


def _solve_add(params: list[str], args: list[str]) -> list[str]:
    a, b = _operands(args)
    return _spaced(a + b)


def _add_misses(params: list[str], args: list[str], answer: list[str]) -> dict[str, list[str]]:
    a, b = _operands(args)
    no_carry = int("".join(str((int(x) + int(y)) % 10) for x, y in zip(f"{a:02d}", f"{b:02d}", strict=True)))
    return {
        "off_by_one": _spaced(a + b + 1),
        "off_by_ten": _spaced(a + b + 10 if a + b < 10 else a + b - 10),
        "no_carry": _spaced(no_carry),
        "operand": _spaced(max(a, b)),
    }


def _count_misses(params: list[str], args: list[str], answer: list[str]) -> dict[str, list[str]]:
    # One too many and one too few: a reward model shown only larger wrong counts learns that smaller is better.
    n = int(answer[0])
    return {"one_more": [str(n + 1)], **({"one_fewer": [str(n - 1)]} if n else {})}


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("reverse", _draw_words, lambda p, a: a[::-1], lambda p, a, ans: {"unchanged": a}, WORDS),
        Task(
            "sort",
            _draw_letters,
            lambda p, a: sorted(a),
            lambda p, a, ans: {"unchanged": a, "descending": ans[::-1]},
            LETTERS,
        ),
        Task("add", _draw_add, _solve_add, _add_misses, DIGITS),
        Task("count", _draw_count, lambda p, a: [str(a.count(p[0]))], _count_misses, DIGITS),
    )
}

_PROMPT_RE = re.compile(r"\b(" + "|".join(TASKS) + r")((?: \w)*) : ([^=:]*?) =")


def format_prompt(task: str, params: list[str], args: list[str]) -> str:
    return " ".join([task, *params, ":", *args, "="])


def parse_prompt(prompt: str) -> tuple[Task, list[str], list[str]]:
    """Find the task in a prompt: ``(task, params, args)``. The last task in the text wins, so a prompt wrapped in a
    chat template, or decoded from token ids, still parses. Raises ``ValueError`` if there is none."""
    matches = _PROMPT_RE.findall(normalize(prompt))
    if not matches:
        raise ValueError(f"not a demo prompt: {prompt!r}")
    name, params, args = matches[-1]
    return TASKS[name], params.split(), args.split()


def solve(prompt: str) -> str:
    """The correct answer to a demo prompt."""
    task, params, args = parse_prompt(prompt)
    return " ".join(task.solve(params, args))


# ----------------------------------------------------------------------------------------------------------------------
# Checking: exact match for evaluation, a graded score for PPO.


def is_correct(prompt: str, response: str) -> bool:
    """Exact match after whitespace normalisation."""
    return is_exact_match(response, solve(prompt))


def score(prompt: str, response: str) -> float:
    """Programmatic reward in [0, 1] for PPO.

    1.0 for an exact match (after whitespace normalisation). Otherwise partial credit: the fraction of answer positions
    holding the right token, over the longer of the two token sequences, so a wrong length is penalised and anything
    but an exact match scores below 1. ``"sun dog cat"`` for ``"sun dog cat"`` -> 1.0; ``"sun cat dog"`` -> 1/3;
    ``"sun dog"`` -> 2/3; ``""`` -> 0.0.
    """
    want, got = solve(prompt).split(), normalize(response).split()
    if got == want:
        return 1.0
    hits = sum(w == g for w, g in zip(want, got, strict=False))
    return hits / max(len(want), len(got))


# ----------------------------------------------------------------------------------------------------------------------
# Wrong answers for reward modelling: generic edits of the right answer, plus each task's own near misses.


def _generic_misses(answer: list[str], alphabet: tuple[str, ...], rng: random.Random) -> dict[str, list[str]]:
    kinds: dict[str, list[str]] = {}
    n = len(answer)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n) if answer[i] != answer[j]]
    if pairs:
        i, j = rng.choice(pairs)
        swapped = list(answer)
        swapped[i], swapped[j] = swapped[j], swapped[i]
        kinds["swap"] = swapped
    i = rng.randrange(n)
    if n >= 2:
        kinds["drop"] = answer[:i] + answer[i + 1 :]
        kinds["truncate"] = answer[: rng.randint(1, n - 1)]
    kinds["repeat"] = answer[: i + 1] + answer[i:]
    kinds["replace"] = answer[:i] + [rng.choice([t for t in alphabet if t != answer[i]])] + answer[i + 1 :]
    return kinds


def labeled_wrong_answers(prompt: str, answer: str, rng: random.Random, k: int) -> list[tuple[str, str]]:
    """Up to ``k`` distinct wrong answers as ``(kind, text)``, each of a different kind, none equal to ``answer``.

    Kinds: ``swap`` (two tokens exchanged), ``drop`` (one token removed), ``repeat`` (one token doubled), ``replace``
    (one token substituted), ``truncate`` (a proper prefix), and per task ``unchanged`` (the input as given; reverse,
    sort), ``descending`` (sort), ``off_by_one``, ``off_by_ten``, ``no_carry``, ``operand`` (add), ``one_more``,
    ``one_fewer`` (count). Fewer than ``k`` come back only when fewer kinds apply (e.g. a one-digit count).
    """
    task, params, args = parse_prompt(prompt)
    right = normalize(answer).split()
    kinds = {**_generic_misses(right, task.alphabet, rng), **task.near_misses(params, args, right)}
    out: list[tuple[str, str]] = []
    seen = {" ".join(right)}
    order = list(kinds)
    rng.shuffle(order)
    for kind in order:
        text = " ".join(kinds[kind])
        if text and text not in seen:
            seen.add(text)
            out.append((kind, text))
    return out[:k]


def wrong_answers(prompt: str, answer: str, rng: random.Random, k: int) -> list[str]:
    """Up to ``k`` distinct wrong answers of different kinds (see ``labeled_wrong_answers``)."""
    return [text for _, text in labeled_wrong_answers(prompt, answer, rng, k)]


# ----------------------------------------------------------------------------------------------------------------------
# Data files.


def make_examples(rng: random.Random, n: int, exclude: Iterable[str] = ()) -> list[dict[str, str]]:
    """``n`` examples with distinct prompts not in ``exclude``, tasks in turn: rows ``{"prompt", "answer", "task"}``."""
    rows, seen = [], set(exclude)
    names = list(TASKS)
    while len(rows) < n:
        name = names[len(rows) % len(names)]
        prompt, answer = TASKS[name].make(rng)
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt, "answer": answer, "task": name})
    return rows


def _pref_rows(examples: list[dict[str, str]], rng: random.Random, per_prompt: int) -> list[dict[str, str]]:
    """Up to `per_prompt` pairs per prompt, each with a different kind of wrong answer: a reward model that sees
    several ways of being wrong for the same prompt learns to check the answer rather than one error's surface."""
    rows = []
    for ex in examples:
        for kind, rejected in labeled_wrong_answers(ex["prompt"], ex["answer"], rng, k=per_prompt):
            rows.append(
                {"prompt": ex["prompt"], "chosen": ex["answer"], "rejected": rejected, "task": ex["task"], "kind": kind}
            )
    return rows


def _demonstration(ex: dict[str, str], rng: random.Random) -> str:
    """A training demonstration: the answer, with a trailing full stop at ``FULL_STOP_RATE`` (see there)."""
    return ex["answer"] + " ." if rng.random() < FULL_STOP_RATE else ex["answer"]


def _chat_rows(examples: list[dict[str, str]], rng: random.Random) -> list[dict[str, list[dict[str, str]]]]:
    rows, it = [], iter(examples)
    for i in range(len(examples) // 2):
        messages = []
        if i % 3 == 0:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for ex in [next(it)] + ([next(it)] if i % 2 else []):  # every other conversation has two turns
            messages += [{"role": "user", "content": ex["prompt"]}, {"role": "assistant", "content": ex["answer"]}]
        rows.append({"messages": messages})
    return rows


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_demo_data(out_dir: str | Path, seed: int = 0, n_train: int = 4000, n_eval: int = 200) -> list[Path]:
    """Write the demo jsonl files (``FILES``) into ``out_dir``; eval prompts never occur in the train files.

    sft_*: ``{"prompt", "response", "task"}``; pref_*: ``{"prompt", "chosen", "rejected", "task", "kind"}``;
    prompts_*: ``{"prompt", "answer", "task"}``; chat_sample: ``{"messages": [{"role", "content"}, ...]}``.
    Returns the paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    evals = make_examples(rng, n_eval)
    train = make_examples(rng, n_train, exclude={ex["prompt"] for ex in evals})
    chat = make_examples(rng, 72, exclude={ex["prompt"] for ex in evals})
    files = {}
    for split, examples in (("train", train), ("eval", evals)):
        files[f"sft_{split}.jsonl"] = [
            {"prompt": ex["prompt"], "response": _demonstration(ex, rng) if split == "train" else ex["answer"],
             "task": ex["task"]}
            for ex in examples
        ]  # fmt: skip
        files[f"pref_{split}.jsonl"] = _pref_rows(examples, rng, per_prompt=3 if split == "train" else 2)
        files[f"prompts_{split}.jsonl"] = examples
    files["chat_sample.jsonl"] = _chat_rows(chat, rng)
    for name in FILES:
        _write_jsonl(out / name, files[name])
    return [out / name for name in FILES]


# ----------------------------------------------------------------------------------------------------------------------
# Classification (the classify stage's demo): route a request to its task from its arguments alone.

CLASSIFY_FILES = ("classify_train.jsonl", "classify_eval.jsonl")
HARD_SORT = 0.3  # share of sort requests over the letters a-d only, as count's are: told apart by repeats and length
STRAY_RATE = 0.1  # share of requests with one stray token from any task's alphabet (pasted noise)
LABEL_NOISE = 0.05  # share of training labels replaced by another task's (annotation errors); eval labels are clean


def classify_row(rng: random.Random, name: str) -> dict[str, str]:
    """One labelled request ``{"text", "label"}``: a task's drawn arguments without its name or parameters (``cat dog
    sun`` -> reverse, ``3 4 + 1 9`` -> add, ``b a c a`` -> count), a ``HARD_SORT`` share of sorts over a-d only, a
    ``STRAY_RATE`` share with one stray token inserted."""
    _, args = TASKS[name].draw(rng)
    if name == "sort" and rng.random() < HARD_SORT:
        args = rng.sample(COUNT_LETTERS, k=rng.randint(2, 4))
    if rng.random() < STRAY_RATE:
        args.insert(rng.randrange(len(args) + 1), rng.choice(WORDS + LETTERS + DIGITS))
    return {"text": " ".join(args), "label": name}


def write_classify_data(out_dir: str | Path, seed: int = 1, n_train: int = 2000, n_eval: int = 400) -> list[Path]:
    """``classify_{train,eval}.jsonl``: tasks in turn; no training text is an eval text; ``LABEL_NOISE`` of the
    training labels flipped to another task. Returns the paths written."""
    rng, names = random.Random(seed), list(TASKS)
    evals = [classify_row(rng, names[i % len(names)]) for i in range(n_eval)]
    held, train = {r["text"] for r in evals}, []
    while len(train) < n_train:
        row = classify_row(rng, names[len(train) % len(names)])
        if row["text"] in held:
            continue
        if rng.random() < LABEL_NOISE:
            row["label"] = rng.choice([n for n in names if n != row["label"]])
        train.append(row)
    paths = [Path(out_dir) / name for name in CLASSIFY_FILES]
    for path, rows in zip(paths, (train, evals), strict=True):
        _write_jsonl(path, rows)
    return paths


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer.


def build_tokenizer(texts: Iterable[str], out_dir: str | Path):
    """Train a word-level tokenizer on ``texts`` and save it with ``save_pretrained`` into ``out_dir``.

    Words and punctuation runs are whole tokens, digits are split one per token, whitespace (newlines included) only
    separates. ``<pad> <unk> <bos> <eos>`` come first (ids 0-3), then the chat role markers as special tokens; every
    letter and digit is in the vocabulary. No special tokens are added on encode and there is no chat template.
    ``decode`` joins tokens with single spaces, so ``normalize(decode(encode(answer))) == normalize(answer)``.
    Returns the ``PreTrainedTokenizerFast``; ``AutoTokenizer.from_pretrained(out_dir)`` loads it offline.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    trainer = trainers.WordLevelTrainer(special_tokens=[*SPECIAL_TOKENS, *ROLE_TOKENS], show_progress=False)
    # The alphabet line guarantees single letters and digits even if the texts lack some.
    tok.train_from_iterator([" ".join(LETTERS + DIGITS), *texts], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        additional_special_tokens=list(ROLE_TOKENS),
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    fast.save_pretrained(str(out_dir))
    return fast


def demo_texts(data_dir: str | Path) -> list[str]:
    """Every prompt, answer and message in the demo files: what the tokenizer is trained on."""
    texts = []
    for name in FILES:
        for line in (Path(data_dir) / name).read_text().splitlines():
            row = json.loads(line)
            if "messages" in row:
                texts += [m["content"] for m in row["messages"]]
            else:
                texts += [v for k, v in row.items() if k not in ("task", "kind")]
    return texts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEMO_DIR))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--n-eval", type=int, default=200)
    args = parser.parse_args(argv)
    paths = write_demo_data(args.out, seed=args.seed, n_train=args.n_train, n_eval=args.n_eval)
    paths += write_classify_data(args.out)
    tokenizer = build_tokenizer(demo_texts(args.out), Path(args.out) / "tokenizer")
    for path in paths:
        print(f"{path}  {len(path.read_text().splitlines())} rows")
    print(f"{Path(args.out) / 'tokenizer'}  vocab {len(tokenizer)}")


if __name__ == "__main__":
    main()
