"""Reasoning-task corpus and tokenizers: answers recomputed independently, reasoning re-checked, splits disjoint."""

from __future__ import annotations

import itertools
import re
from fractions import Fraction

import numpy as np
import pytest

from m1jax.data.tasks import (
    OOD_DIFFICULTIES,
    TASKS,
    TRAIN_DIFFICULTIES,
    Example,
    examples,
    extract_answer,
    make_example,
    score,
    split_of,
)
from m1jax.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer


def _take(seed, split, n, tasks=TASKS):
    return list(itertools.islice(examples(seed, split, tasks), n))


def _all_examples():
    rng = np.random.default_rng(123)
    return [make_example(rng, t, d) for t in TASKS for d in range(1, 6) for _ in range(60)]


# Independent solvers: parse the prompt, compute with plain Python.
def _solve(prompt: str) -> str:
    if m := re.fullmatch(r"add (\d+)\+(\d+)=\?\n", prompt):
        return str(int(m[1]) + int(m[2]))
    if m := re.fullmatch(r"sub (\d+)-(\d+)=\?\n", prompt):
        return str(int(m[1]) - int(m[2]))
    if m := re.fullmatch(r"mul (\d+)\*(\d+)=\?\n", prompt):
        return str(int(m[1]) * int(m[2]))
    if m := re.fullmatch(r"copy (\w+)\n", prompt):
        return m[1]
    if m := re.fullmatch(r"reverse (\w+)\n", prompt):
        return "".join(reversed(m[1]))
    if m := re.fullmatch(r"sort (\d+)\n", prompt):
        return "".join(sorted(m[1]))
    if m := re.fullmatch(r"solve (\d+)x([+-])(\d+)=(-?\d+)\n", prompt):
        a, b, c = int(m[1]), int(m[3]) * (1 if m[2] == "+" else -1), int(m[4])
        x = Fraction(c - b, a)
        assert x.denominator == 1, prompt
        return str(x.numerator)
    raise AssertionError(f"unparseable prompt {prompt!r}")


def _check_add(ex: Example) -> None:
    a, b = map(int, re.fullmatch(r"add (\d+)\+(\d+)=\?\n", ex.prompt).groups())
    carry, digits = 0, []
    for i, step in enumerate(ex.reasoning.removesuffix(";").split("; ")):
        x, y, c_in, s, c_out = re.fullmatch(r"(\d)\+(\d)(\+1)?=(\d+)( c1)?", step).groups()
        assert (int(x), int(y)) == (a // 10**i % 10, b // 10**i % 10)
        assert bool(c_in) == bool(carry) and int(s) == int(x) + int(y) + carry
        carry = int(s) // 10
        assert bool(c_out) == bool(carry)
        digits.append(str(int(s) % 10))
    assert str(int(("1" if carry else "") + "".join(reversed(digits)))) == ex.answer


def _check_sub(ex: Example) -> None:
    a, b = map(int, re.fullmatch(r"sub (\d+)-(\d+)=\?\n", ex.prompt).groups())
    borrow, digits = 0, []
    for i, step in enumerate(ex.reasoning.removesuffix(";").split("; ")):
        x, y, b_in, r, b_out = re.fullmatch(r"(\d+)-(\d)(-1)?=(\d)( b1)?", step).groups()
        assert int(x) == a // 10**i % 10 + (10 if b_out else 0) and int(y) == b // 10**i % 10
        assert bool(b_in) == bool(borrow) and int(r) == int(x) - int(y) - borrow
        borrow = int(bool(b_out))
        digits.append(r)
    assert borrow == 0 and str(int("".join(reversed(digits)))) == ex.answer


def _check_mul(ex: Example) -> None:
    a, b = map(int, re.fullmatch(r"mul (\d+)\*(\d+)=\?\n", ex.prompt).groups())
    steps = ex.reasoning.removesuffix(";").split("; ")
    partials = [re.fullmatch(r"(\d+)\*(\d+)=(\d+)", s).groups() for s in steps if "*" in s]
    assert all(int(p) == int(x) * int(m) and int(x) == a for x, m, p in partials)
    assert sum(int(m) for _, m, _ in partials) == b
    if len(partials) > 1:
        terms, total = steps[-1].split("=")
        assert [int(t) for t in terms.split("+")] == [int(p) for *_, p in partials]
        assert int(total) == sum(int(p) for *_, p in partials) == int(ex.answer)
    else:
        assert partials[0][2] == ex.answer


def _check_linear(ex: Example) -> None:
    a, sign, b, c = re.fullmatch(r"solve (\d+)x([+-])(\d+)=(-?\d+)\n", ex.prompt).groups()
    m = re.fullmatch(r"(\d+)x=(-?\d+)([+-])(\d+)=(-?\d+); x=(-?\d+)/(\d+)=(-?\d+);", ex.reasoning)
    a2, c2, op, b2, ax, ax2, a3, x = m.groups()
    assert a2 == a3 == a and c2 == c and b2 == b and op != sign and ax == ax2
    assert int(ax) == int(c) + (int(b) if op == "+" else -int(b)) and int(ax) == int(a) * int(x)
    assert x == ex.answer


def test_answers_match_independent_solver():
    for ex in _all_examples():
        assert ex.answer == _solve(ex.prompt), ex
        assert ex.prompt.endswith("\n") and ex.prompt.count("\n") == 1
        assert ex.text == ex.prompt + "<think>" + ex.reasoning + "</think> " + ex.answer
        assert score(ex.completion, ex.answer) == 1.0


def test_reasoning_is_consistent():
    checks = {"add": _check_add, "sub": _check_sub, "mul": _check_mul, "linear": _check_linear}
    for ex in _all_examples():
        if ex.task in checks:
            checks[ex.task](ex)
        elif ex.task == "sort":
            counts = dict(s.split(":") for s in ex.reasoning.split(" "))
            assert "".join(k * int(n) for k, n in counts.items()) == ex.answer
        else:  # copy / reverse spell the answer out character by character
            assert ex.reasoning == " ".join(ex.answer)


def test_linear_has_negative_solutions_and_both_signs():
    exs = [make_example(np.random.default_rng(i), "linear", 2) for i in range(200)]
    assert any(ex.answer.startswith("-") for ex in exs)
    assert any("x+" in ex.prompt for ex in exs) and any("x-" in ex.prompt for ex in exs)


def test_difficulty_grows_and_train_texts_are_short():
    rng = np.random.default_rng(0)
    mean_len = {d: np.mean([len(make_example(rng, t, d).text) for t in TASKS for _ in range(50)]) for d in range(1, 6)}
    assert all(mean_len[d] < mean_len[d + 1] for d in range(1, 5))
    train = _take(0, "train", 2000)
    assert np.mean([len(ex.text) <= 120 for ex in train]) > 0.9


def test_stream_is_deterministic_per_seed():
    a, b, c = _take(7, "train", 200), _take(7, "train", 200), _take(8, "train", 200)
    assert a == b and a != c
    assert _take(7, "ood", 50) == _take(7, "ood", 50)


def test_splits_are_disjoint_and_cover_tasks():
    train = _take(0, "train", 4000)
    test = _take(0, "test", 400)
    train_prompts = {ex.prompt for ex in train}
    assert all(split_of(ex.prompt) == "train" for ex in train)
    assert all(split_of(ex.prompt) == "test" for ex in test)
    assert not train_prompts & {ex.prompt for ex in test}
    for split in (train, test):
        assert {ex.task for ex in split} == set(TASKS)
        assert {ex.difficulty for ex in split} == set(TRAIN_DIFFICULTIES)
    ood = _take(0, "ood", 300)
    assert {ex.difficulty for ex in ood} == set(OOD_DIFFICULTIES) and {ex.task for ex in ood} == set(TASKS)


def test_split_of_is_stable_and_about_five_percent():
    assert split_of("add 1+2=?\n") == split_of("add 1+2=?\n")
    frac = np.mean([split_of(f"copy {i}\n") == "test" for i in range(20000)])
    assert 0.04 < frac < 0.06


def test_task_subset():
    assert {ex.task for ex in _take(1, "train", 100, tasks=("mul", "sort"))} == {"mul", "sort"}


def test_bad_inputs_raise():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="divide"):
        make_example(rng, "divide", 1)
    for d in (0, 6, 2.0, True):
        with pytest.raises(ValueError, match="difficulty"):
            make_example(rng, "add", d)
    with pytest.raises(ValueError, match="valid"):
        examples(0, "valid")
    with pytest.raises(ValueError, match="nope"):
        examples(0, "train", tasks=("add", "nope"))
    with pytest.raises(ValueError):
        examples(0, "train", tasks=())


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>7+5=12 c1;</think> 12", "12"),
        ("<think>x</think>   -4  \nmore text", "-4"),
        ("<think>a</think> 1</think> 2", "2"),
        ("<think>no end", None),
        ("12", None),
        ("</think>", ""),
        ("</think>\n\n 7\n8", "7"),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_score():
    assert score("<think>..</think> 6", "6") == 1.0
    assert score("<think>..</think>  6 \n", "6") == 1.0
    assert score("<think>..</think> 7", "6") == 0.0
    assert score("<think>..</think> 66", "6") == 0.0
    assert score("<think>.. 6", "6") == 0.0
    assert score("", "6") == 0.0


# Tokenizers.
def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    assert tok.vocab_size == 261 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    for i, s in enumerate(("<pad>", "<bos>", "<eos>", "<think>", "</think>")):
        assert tok.encode(s) == [i] and tok.token_to_id(s) == i
    assert tok.token_to_id("a") == 5 + ord("a") and tok.token_to_id("é") is None
    text = "héllo 世界 🙂<think>2+2=4;</think> 4<eos>"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and max(ids) < tok.vocab_size
    assert ids.count(3) == 1 and ids.count(4) == 1 and ids.count(2) == 2
    assert tok.decode(ids) == "<bos>" + text + "<eos>"
    assert tok.decode(ids, skip_special=True) == "héllo 世界 🙂2+2=4; 4"
    assert tok.decode([0, 0] + tok.encode("ab") + [0]) == "ab"
    assert tok.decode(np.array(tok.encode("ok"))) == "ok"
    assert repr(tok) == repr(ByteTokenizer())  # stable: used as a cache key


def test_byte_tokenizer_invalid_bytes_are_replaced():
    tok = ByteTokenizer()
    broken = tok.encode("é")[:1] + tok.encode("<think>x")
    assert tok.decode(broken) == "\ufffd<think>x"
    assert tok.decode([5 + ord("a"), 300]) == "a\ufffd"


def test_example_token_lengths_fit_short_context():
    tok = ByteTokenizer()
    lens = [len(tok.encode(ex.text, bos=True, eos=True)) for ex in _take(3, "train", 1000)]
    assert max(lens) <= 128


def _write_hf_tokenizer(path, specials):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [make_example(np.random.default_rng(i), t, 2).text for i in range(20) for t in TASKS]
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.save(str(path))
    return str(path)


def test_hf_tokenizer(tmp_path):
    path = _write_hf_tokenizer(tmp_path / "tok.json", ["<pad>", "<s>", "</s>", "<think>", "</think>"])
    tok = HFTokenizer(path)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size >= 256 and tok.token_to_id("<think>") == 3 and tok.token_to_id("zzz-not-a-token") is None
    text = "add 358+47=?\n<think>8+7=15 c1;</think> 405"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(3) == 1 and ids.count(4) == 1
    assert tok.decode(ids[1:-1]) == text
    assert tok.decode([0] + ids + [0, 0], skip_special=True) == "add 358+47=?\n8+7=15 c1; 405"
    assert isinstance(load_tokenizer(path), HFTokenizer) and repr(load_tokenizer(path)) == repr(tok)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        load_tokenizer(str(tmp_path))  # a folder counts only when it holds tokenizer.json


def test_hf_tokenizer_fallbacks_and_errors(tmp_path):
    gpt2_like = _write_hf_tokenizer(tmp_path / "a.json", ["<|endoftext|>"])
    tok = HFTokenizer(gpt2_like)
    assert tok.eos_id == tok.bos_id == tok.pad_id == 0
    no_eos = _write_hf_tokenizer(tmp_path / "b.json", ["<pad>", "<end>"])
    with pytest.raises(ValueError, match="eos"):
        HFTokenizer(no_eos)
    tok = HFTokenizer(no_eos, eos_token="<end>")
    assert tok.eos_id == 1 and tok.pad_id == 0 and tok.bos_id == 1
    with pytest.raises(ValueError, match="<missing>"):
        HFTokenizer(no_eos, eos_token="<end>", bos_token="<missing>")


def test_load_tokenizer_dispatch(tmp_path):
    assert isinstance(load_tokenizer(None), ByteTokenizer) and isinstance(load_tokenizer("byte"), ByteTokenizer)
    _write_hf_tokenizer(tmp_path / "tokenizer.json", ["<pad>", "<s>", "</s>"])
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)
    with pytest.raises(ValueError, match="not found"):
        load_tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="unknown tokenizer"):
        load_tokenizer("gpt2")
