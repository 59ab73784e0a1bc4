"""Deterministic, verifiable reasoning tasks: text for pretraining and exact-match rewards for RL.

Every example is `prompt + "<think>" + reasoning + "</think> " + answer`. The reasoning is a short,
correct worked solution (column arithmetic with carries/borrows, partial products, ...), so a small
model can learn the procedure; the answer can always be checked exactly with `score`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence

import numpy as np

TASKS = ("add", "sub", "mul", "copy", "reverse", "sort", "linear")
# Tasks whose text holds tool calls (`rl.tools` format): they need a tokenizer with the tool-call
# tokens ("byte+tools"), so they are not in the default TASKS.
TOOL_TASKS = ("calc",)
DIFFICULTIES = (1, 2, 3, 4, 5)
TRAIN_DIFFICULTIES = (1, 2, 3)
OOD_DIFFICULTIES = (4, 5)
SPLITS = ("train", "test", "ood")
TEST_FRACTION_DENOM = 20  # 1 in 20 prompts (5%) is held out as the in-distribution test set

THINK, END_THINK = "<think>", "</think>"

# Per-difficulty sizes (index difficulty - 1).
_ADD_DIGITS = (2, 3, 4, 5, 6)
_MUL_DIGITS = ((2, 1), (3, 1), (3, 2), (4, 2), (5, 3))  # (multiplicand, multiplier) digits
_STR_LEN = ((2, 3), (4, 5), (6, 8), (9, 11), (12, 16))  # inclusive length range
_LIN_COEF = (3, 5, 9, 19, 49)  # max a (min 2)
_LIN_X = (5, 9, 20, 50, 100)  # max |x|
_LIN_B = (9, 20, 50, 100, 500)  # max b (min 1)
_ALNUM = "0123456789abcdefghijklmnopqrstuvwxyz"
_CALC_DIGITS = ((3, 2), (4, 2), (4, 3), (5, 3), (6, 4))  # (multiplicand, multiplier) digits
CALC_TOOL_SHARE = 0.5  # of `calc` demonstrations that call the calculator; the rest multiply in the head


@dataclasses.dataclass(frozen=True)
class Example:
    """One task instance; `text` is what the model trains on, `answer` what `score` checks."""

    task: str
    difficulty: int
    prompt: str
    reasoning: str
    answer: str

    @property
    def completion(self) -> str:
        return THINK + self.reasoning + END_THINK + " " + self.answer

    @property
    def text(self) -> str:
        return self.prompt + self.completion


def _int(rng: np.random.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] as a Python int."""
    return int(rng.integers(lo, hi + 1))


def _number(rng: np.random.Generator, digits: int) -> int:
    """Uniform number with exactly `digits` digits (0-9 for one digit)."""
    return _int(rng, 0, 9) if digits == 1 else _int(rng, 10 ** (digits - 1), 10**digits - 1)


def _rdigits(n: int) -> list[int]:
    """Decimal digits of n >= 0, least significant first."""
    return [int(c) for c in reversed(str(n))]


def add_steps(a: int, b: int) -> str:
    """Column addition from the right, e.g. "8+7=15 c1; 5+4+1=10 c1; 3+0+1=4;"."""
    xs, ys = _rdigits(a), _rdigits(b)
    carry, parts = 0, []
    for i in range(max(len(xs), len(ys))):
        x, y = (xs[i] if i < len(xs) else 0), (ys[i] if i < len(ys) else 0)
        s = x + y + carry
        parts.append(f"{x}+{y}{'+1' if carry else ''}={s}{' c1' if s >= 10 else ''}")
        carry = s // 10
    return "; ".join(parts) + ";"


def sub_steps(a: int, b: int) -> str:
    """Column subtraction (a >= b) from the right, e.g. "12-7=5 b1; 5-4-1=0; 3-0=3;"."""
    xs, ys = _rdigits(a), _rdigits(b)
    borrow, parts = 0, []
    for i, x in enumerate(xs):
        y = ys[i] if i < len(ys) else 0
        need = x - borrow < y
        r = x + 10 * need - y - borrow
        parts.append(f"{x + 10 * need}-{y}{'-1' if borrow else ''}={r}{' b1' if need else ''}")
        borrow = int(need)
    return "; ".join(parts) + ";"


def mul_steps(a: int, b: int) -> str:
    """Partial products by each nonzero multiplier digit (with place value), then their sum."""
    terms = [d * 10**i for i, d in enumerate(_rdigits(b)) if d] or [0]
    parts = [f"{a}*{t}={a * t}" for t in terms]
    if len(terms) > 1:
        parts.append("+".join(str(a * t) for t in terms) + f"={a * b}")
    return "; ".join(parts) + ";"


def _make_add(rng: np.random.Generator, d: int) -> tuple[str, str, str]:
    n = _ADD_DIGITS[d - 1]
    a, b = _number(rng, n), _number(rng, _int(rng, 1, n))
    if rng.random() < 0.5:
        a, b = b, a
    return f"add {a}+{b}=?\n", add_steps(a, b), str(a + b)


def _make_sub(rng: np.random.Generator, d: int) -> tuple[str, str, str]:
    n = _ADD_DIGITS[d - 1]
    a, b = _number(rng, n), _number(rng, _int(rng, 1, n))
    a, b = max(a, b), min(a, b)  # keep the result non-negative
    return f"sub {a}-{b}=?\n", sub_steps(a, b), str(a - b)


def _make_mul(rng: np.random.Generator, d: int) -> tuple[str, str, str]:
    na, nb = _MUL_DIGITS[d - 1]
    a, b = _number(rng, na), _number(rng, nb)
    return f"mul {a}*{b}=?\n", mul_steps(a, b), str(a * b)


def _make_calc(rng: np.random.Generator, d: int) -> tuple[str, str, str]:
    """Products too long for a small model to multiply in its head. Half the demonstrations call the
    calculator and copy its result; the other half work the partial products (`mul`'s), which a
    tiny model gets wrong at these sizes, so RL has a choice to learn: use the tool."""
    na, nb = _CALC_DIGITS[d - 1]
    a, b = _number(rng, na), _number(rng, nb)
    if rng.random() < CALC_TOOL_SHARE:
        reasoning = f"<tool_call>calculator\n{a}*{b}</tool_call><tool_response>{a * b}</tool_response>"
    else:
        reasoning = mul_steps(a, b)
    return f"calc {a}*{b}=?\n", reasoning, str(a * b)


def _string(rng: np.random.Generator, d: int, alphabet: str) -> str:
    lo, hi = _STR_LEN[d - 1]
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), size=_int(rng, lo, hi)))


def _make_copy(rng: np.random.Generator, d: int) -> tuple[str, str, str]:
    s = _string(rng, d, _ALNUM)
    return f"copy {s}\n", " ".join(s), s


def _make_reverse(rng: np.random.Generator, d: int) -> tuple[str, str, str]:
    s = _string(rng, d, _ALNUM)
    return f"reverse {s}\n", " ".join(reversed(s)), s[::-1]


def _make_sort(rng: np.random.Generator, d: int) -> tuple[str, str, str]:
    s = _string(rng, d, "0123456789")
    # Counting sort: the digit counts determine the answer.
    counts = " ".join(f"{c}:{s.count(c)}" for c in sorted(set(s)))
    return f"sort {s}\n", counts, "".join(sorted(s))


def _make_linear(rng: np.random.Generator, d: int) -> tuple[str, str, str]:
    a, x, b = _int(rng, 2, _LIN_COEF[d - 1]), _int(rng, -_LIN_X[d - 1], _LIN_X[d - 1]), _int(rng, 1, _LIN_B[d - 1])
    if rng.random() < 0.5:  # a*x + b = c  ->  a*x = c - b
        c = a * x + b
        prompt, undo = f"solve {a}x+{b}={c}\n", f"{c}-{b}"
    else:  # a*x - b = c  ->  a*x = c + b
        c = a * x - b
        prompt, undo = f"solve {a}x-{b}={c}\n", f"{c}+{b}"
    return prompt, f"{a}x={undo}={a * x}; x={a * x}/{a}={x};", str(x)


_MAKERS = {
    "add": _make_add,
    "sub": _make_sub,
    "mul": _make_mul,
    "copy": _make_copy,
    "reverse": _make_reverse,
    "sort": _make_sort,
    "linear": _make_linear,
    "calc": _make_calc,
}


def _check_task(task: str) -> None:
    if task not in _MAKERS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS + TOOL_TASKS}")


def make_example(rng: np.random.Generator, task: str, difficulty: int) -> Example:
    """Sample one example of `task` at `difficulty` (1..5) using `rng`."""
    _check_task(task)
    if isinstance(difficulty, bool) or not isinstance(difficulty, int | np.integer) or difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be an int in {DIFFICULTIES}, got {difficulty!r}")
    prompt, reasoning, answer = _MAKERS[task](rng, int(difficulty))
    return Example(task, int(difficulty), prompt, reasoning, answer)


def split_of(prompt: str) -> str:
    """Stable hash split of a prompt: "test" for ~5% of prompts, else "train"."""
    h = int.from_bytes(hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest(), "little")
    return "test" if h % TEST_FRACTION_DENOM == 0 else "train"


def examples(seed: int, split: str, tasks: Sequence[str] = TASKS) -> Iterator[Example]:
    """Infinite deterministic stream of examples for `split` ("train", "test" or "ood")."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    tasks = tuple(tasks)
    if not tasks:
        raise ValueError("examples: `tasks` is empty")
    for t in tasks:
        _check_task(t)
    # Validate eagerly above; the generator itself starts only on the first next().
    return _stream(seed, split, tasks)


def _stream(seed: int, split: str, tasks: tuple[str, ...]) -> Iterator[Example]:
    # Separate entropy per split so the streams are not correlated with each other.
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    difficulties = OOD_DIFFICULTIES if split == "ood" else TRAIN_DIFFICULTIES
    while True:
        task = tasks[int(rng.integers(len(tasks)))]
        d = difficulties[int(rng.integers(len(difficulties)))]
        ex = make_example(rng, task, d)
        if split == "ood" or split_of(ex.prompt) == split:
            yield ex


def extract_answer(completion: str) -> str | None:
    """The stripped first line after the last "</think>", or None if the model never closed its thinking."""
    if END_THINK not in completion:
        return None
    tail = completion.rsplit(END_THINK, 1)[1].strip()
    return tail.split("\n", 1)[0].strip()


def score(completion: str, answer: str) -> float:
    """Exact-match reward: 1.0 if the extracted answer equals `answer`, else 0.0."""
    return 1.0 if extract_answer(completion) == answer else 0.0
