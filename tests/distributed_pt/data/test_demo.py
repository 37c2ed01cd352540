import json
import random
from pathlib import Path

import pytest

from distributed_pt.config import DEMO_DIR
from distributed_pt.data import demo

DEMO = DEMO_DIR


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO / "tokenizer")


@pytest.mark.parametrize("name", list(demo.TASKS))
def test_make_is_deterministic(name):
    task = demo.TASKS[name]
    a, b = random.Random(7), random.Random(7)
    assert [task.make(a) for _ in range(20)] == [task.make(b) for _ in range(20)]


def test_hand_checked_examples():
    assert demo.solve("reverse : cat dog sun =") == "sun dog cat"
    assert demo.solve("sort : d a c =") == "a c d"
    assert demo.solve("add : 3 4 + 1 9 =") == "5 3"
    assert demo.solve("add : 9 9 + 1 =") == "1 0 0"
    assert demo.solve("count a : b a c a =") == "2"
    # Wrapped in a chat template, or decoded from ids with extra whitespace: still parses.
    assert demo.solve("<|user|>\nsort : d a c =\n<|assistant|>\n") == "a c d"
    assert demo.score("reverse : cat dog sun =", "  sun dog\ncat ") == 1.0
    assert demo.score("reverse : cat dog sun =", "sun cat dog") == pytest.approx(1 / 3)
    assert demo.score("reverse : cat dog sun =", "sun dog") == pytest.approx(2 / 3)
    assert demo.score("reverse : cat dog sun =", "sun dog cat cat") == pytest.approx(3 / 4)
    assert demo.score("reverse : cat dog sun =", "") == 0.0
    with pytest.raises(ValueError, match="not a demo prompt"):
        demo.solve("hello there")


@pytest.mark.parametrize("seed", range(25))
def test_answers_score_one_and_wrong_answers_are_wrong(seed):
    rng = random.Random(seed)
    for name, task in demo.TASKS.items():
        for _ in range(10):
            prompt, answer = task.make(rng)
            assert demo.solve(prompt) == answer
            assert demo.is_correct(prompt, answer) and demo.score(prompt, answer) == 1.0
            labeled = demo.labeled_wrong_answers(prompt, answer, rng, k=8)
            assert len(labeled) >= 2, (name, prompt)
            assert len({kind for kind, _ in labeled}) == len(labeled)
            texts = [text for _, text in labeled]
            assert len(set(texts)) == len(texts)
            for kind, text in labeled:
                assert not demo.is_correct(prompt, text), (kind, prompt, text)
                assert 0.0 <= demo.score(prompt, text) < 1.0, (kind, prompt, text)
            assert len(demo.wrong_answers(prompt, answer, rng, k=2)) == 2


def test_shipped_files_eval_disjoint_from_train():
    for kind in ("sft", "pref", "prompts"):
        train = {r["prompt"] for r in _rows(DEMO / f"{kind}_train.jsonl")}
        evals = {r["prompt"] for r in _rows(DEMO / f"{kind}_eval.jsonl")}
        assert train and evals and not train & evals
    chat = {m["content"] for r in _rows(DEMO / "chat_sample.jsonl") for m in r["messages"] if m["role"] == "user"}
    assert not chat & {r["prompt"] for r in _rows(DEMO / "sft_eval.jsonl")}


def test_shipped_rows_are_right():
    for r in _rows(DEMO / "sft_eval.jsonl"):
        assert demo.is_correct(r["prompt"], r["response"])
    # Training demonstrations: right, except that about FULL_STOP_RATE of them end with a full stop, which is wrong.
    train = _rows(DEMO / "sft_train.jsonl")
    stops = [r["response"].endswith(" .") for r in train]
    for r, stop in zip(train, stops, strict=True):
        assert demo.is_correct(r["prompt"], r["response"].removesuffix(" .")) and not (
            stop and demo.is_correct(r["prompt"], r["response"])
        )
    assert abs(sum(stops) / len(stops) - demo.FULL_STOP_RATE) < 0.03
    for r in _rows(DEMO / "pref_eval.jsonl"):
        assert demo.is_correct(r["prompt"], r["chosen"]) and not demo.is_correct(r["prompt"], r["rejected"])
    for r in _rows(DEMO / "chat_sample.jsonl"):
        msgs = [m for m in r["messages"] if m["role"] != "system"]
        for user, assistant in zip(msgs[::2], msgs[1::2], strict=True):
            assert (user["role"], assistant["role"]) == ("user", "assistant")
            assert demo.is_correct(user["content"], assistant["content"])
    assert sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file()) < 5_000_000


def test_shipped_tokenizer(tokenizer):
    assert (tokenizer.pad_token, tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token) == (
        "<pad>",
        "<unk>",
        "<bos>",
        "<eos>",
    )
    assert tokenizer.chat_template is None
    assert len(tokenizer) < 300
    # Role markers are whole tokens; digits are split; newlines only separate.
    ids = tokenizer("<|user|>\nadd : 34 + 1 9 =\n<|assistant|>\n5 3<eos>", add_special_tokens=False)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["<|user|>", "add", ":", "3", "4", "+", "1", "9", "=", "<|assistant|>", "5", "3", "<eos>"]
    assert tokenizer.unk_token_id not in ids
    for r in _rows(DEMO / "prompts_eval.jsonl"):
        for text in (r["prompt"], r["answer"]):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids
            assert demo.normalize(tokenizer.decode(ids, skip_special_tokens=True)) == text
        generated = tokenizer(r["answer"] + "<eos><pad>", add_special_tokens=False)["input_ids"]
        assert demo.is_correct(r["prompt"], tokenizer.decode(generated, skip_special_tokens=True))


def test_regenerating_reproduces_shipped_assets(tmp_path):
    demo.main(["--out", str(tmp_path)])
    for name in demo.FILES:
        assert (tmp_path / name).read_bytes() == (DEMO / name).read_bytes(), name
    fresh = json.loads((tmp_path / "tokenizer" / "tokenizer.json").read_text())
    shipped = json.loads((DEMO / "tokenizer" / "tokenizer.json").read_text())
    assert fresh["model"]["vocab"] == shipped["model"]["vocab"]
    assert fresh["added_tokens"] == shipped["added_tokens"]
