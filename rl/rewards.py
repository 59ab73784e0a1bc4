"""Reward functions by name, for RL on verifiable tasks.

Every reward is `fn(completions: Sequence[str], refs: Sequence[Mapping]) -> np.ndarray` float32 [N]:
completion i is scored against `refs[i]`, the metadata of its prompt (e.g. {"answer": "123",
"task": "add"}, or {"tests": "assert f(2) == 4"} for code). Rewards never raise on bad completions
(garbage, empty, odd unicode) and never return NaN; a ref missing a key the reward needs is a
programming error and raises KeyError naming the reward and the key.

Registered: "task" (exact answer of the embedded task family), "positions" (per-character partial
credit), "format" (one think block, then an answer), "math" (math_verify equivalence), "code"
(program + asserts run in `rl.sandbox`). `combine({"task": 1.0, "format": 0.1})` is a weighted sum.
`soft_overlong_penalty` scores response lengths, not texts: `rl.loop` adds it (config.rl.overlong).
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from m1jax.data import tasks as task_lib
from rl import sandbox

RewardFn = Callable[[Sequence[str], Sequence[Mapping[str, Any]]], np.ndarray]
_REGISTRY: dict[str, RewardFn] = {}
THINK, END_THINK = task_lib.THINK, task_lib.END_THINK


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding a reward under `name` (names are unique)."""

    def add(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return add


def available() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get(name: str) -> RewardFn:
    if name not in _REGISTRY:
        raise KeyError(f"unknown reward {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]


def combine(weights: Mapping[str, float]) -> RewardFn:
    """Reward fn computing sum_k weights[k] * get(k)(completions, refs); zero weights are skipped."""
    if not weights:
        raise ValueError("combine: no rewards given")
    parts = []
    for name, w in weights.items():
        fn = get(name)  # fail on unknown names now, not at the first step
        if not math.isfinite(w):
            raise ValueError(f"combine: weight of reward {name!r} must be finite, got {w!r}")
        if w != 0:
            parts.append((float(w), fn))

    def combined(completions: Sequence[str], refs: Sequence[Mapping[str, Any]]) -> np.ndarray:
        _check_lengths(completions, refs, "combine")
        total = np.zeros(len(completions), np.float64)
        for w, fn in parts:
            total += w * np.asarray(fn(completions, refs), np.float64)
        return total.astype(np.float32)

    combined.__name__ = "combine(" + ",".join(f"{k}:{v:g}" for k, v in weights.items()) + ")"
    return combined


def soft_overlong_penalty(lengths, max_length: int, buffer: int) -> np.ndarray:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13) of responses of `lengths` tokens,
    float64: 0 for L <= max_length - buffer, (max_length - buffer - L) / buffer up to L = max_length
    (so -1 there), and -1 beyond. It grades the length a response may use before the hard cut at
    max_new_tokens instead of treating every cut response like a wrong one."""
    if not 1 <= buffer <= max_length:
        raise ValueError(f"soft_overlong_penalty: need 1 <= buffer <= max_length, got buffer={buffer}, {max_length=}")
    lengths = np.asarray(lengths, np.float64)
    return np.clip((max_length - buffer - lengths) / buffer, -1.0, 0.0)


def _check_lengths(completions: Sequence[Any], refs: Sequence[Any], reward: str) -> None:
    if len(completions) != len(refs):
        raise ValueError(f"reward {reward!r}: {len(completions)} completions but {len(refs)} refs")


def _need(refs: Sequence[Mapping[str, Any]], key: str, reward: str) -> list[Any]:
    """refs[i][key] for all i; KeyError naming the reward when one is missing."""
    out = []
    for i, ref in enumerate(refs):
        if key not in ref:
            raise KeyError(f"reward {reward!r} needs ref[{key!r}], missing in refs[{i}] (keys: {sorted(ref)})")
        out.append(ref[key])
    return out


def _text(x: Any) -> str:
    """Completions are str; tolerate bytes / None from upstream bugs rather than crash the step."""
    if isinstance(x, str):
        return x
    if isinstance(x, bytes | bytearray):
        return bytes(x).decode("utf-8", "replace")
    return "" if x is None else str(x)


def _scores(values: Sequence[float]) -> np.ndarray:
    out = np.asarray(values, np.float32).reshape(-1)
    return np.where(np.isfinite(out), out, np.float32(0.0))


@register("task")
def task_reward(completions: Sequence[str], refs: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """1.0 if the answer after the last "</think>" (first line) equals ref["answer"] exactly."""
    _check_lengths(completions, refs, "task")
    answers = _need(refs, "answer", "task")
    return _scores([task_lib.score(_text(c), str(a)) for c, a in zip(completions, answers, strict=True)])


def _position_credit(pred: str | None, answer: str) -> float:
    if pred is None:
        return 0.0
    n = max(len(pred), len(answer))
    return 1.0 if n == 0 else sum(p == a for p, a in zip(pred, answer, strict=False)) / n


@register("positions")
def positions_reward(completions: Sequence[str], refs: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Fraction of positions i < max(len(pred), len(answer)) where pred[i] == answer[i].

    pred is the extracted answer (`extract_answer`; 0 when there is none) or, if ref["raw"] is
    true (the from-scratch toys, which have no think block), the whole stripped completion. Too
    long or too short answers lose the missing/extra positions, so the maximum is exact match.
    """
    _check_lengths(completions, refs, "positions")
    answers = _need(refs, "answer", "positions")
    out = []
    for c, a, ref in zip(completions, answers, refs, strict=True):
        c = _text(c)
        pred = c.strip() if ref.get("raw", False) else task_lib.extract_answer(c)
        out.append(_position_credit(pred, str(a)))
    return _scores(out)


def _well_formed(c: str) -> bool:
    if c.count(THINK) != 1 or c.count(END_THINK) != 1 or not c.lstrip().startswith(THINK):
        return False
    return c.index(THINK) < c.index(END_THINK) and bool(task_lib.extract_answer(c))


@register("format")
def format_reward(completions: Sequence[str], refs: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """1.0 for "<think>...</think> answer": the completion opens with the only think block and a
    non-empty line follows its only "</think>"; else 0.0. refs are not used."""
    _check_lengths(completions, refs, "format")
    return _scores([float(_well_formed(_text(c))) for c in completions])


def _after_think(c: str) -> str:
    return c.rsplit(END_THINK, 1)[1] if END_THINK in c else c


@register("math")
def math_reward(completions: Sequence[str], refs: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """1.0 if math_verify finds the answer (text after the last "</think>", \\boxed{} preferred)
    equivalent to ref["answer"] (e.g. "0.5" vs "\\boxed{\\frac{1}{2}}", "x = 3" vs "3").

    math_verify's time limits (ref.get("timeout_s", 3) s each for parsing and comparing) use
    SIGALRM, which only works in the main thread; elsewhere they are off, so a pathological answer
    (e.g. 9^{9^{9^9}}) can take very long there: call this from the main thread.
    """
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    _check_lengths(completions, refs, "math")
    golds = _need(refs, "answer", "math")
    main = threading.current_thread() is threading.main_thread()
    out = []
    for c, gold, ref in zip(completions, golds, refs, strict=True):
        t = max(1, math.ceil(ref.get("timeout_s", 3))) if main else None
        try:
            # A bare LaTeX gold ("\\sqrt{2}") only parses inside math delimiters.
            g = parse(str(gold), parsing_timeout=t) or parse(f"${gold}$", parsing_timeout=t)
            p = parse(_after_think(_text(c)), parsing_timeout=t)
            out.append(1.0 if g and p and verify(g, p, timeout_seconds=t) else 0.0)
        except (Exception, TimeoutException):
            out.append(0.0)
    return _scores(out)


_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(completion: str) -> str:
    """The last ```python fenced block, else the text after the last "</think>", else everything."""
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else _after_think(completion)


@register("code")
def code_reward(completions: Sequence[str], refs: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """1.0 if `extract_code(completion) + ref["tests"]` exits with status 0 in `rl.sandbox`.

    Optional ref keys: "timeout_s" (wall, default 5), "cpu_s" (default ceil(timeout_s)),
    "memory_mb" (default 512), "stdin" (default ""). Programs see only the standard library and run
    concurrently, one per CPU.
    """
    _check_lengths(completions, refs, "code")
    tests = _need(refs, "tests", "code")
    programs, options, idx = [], [], []
    for i, (c, t, ref) in enumerate(zip(completions, tests, refs, strict=True)):
        code = extract_code(_text(c))
        if not code.strip():
            continue  # nothing to run: 0 without a subprocess
        timeout_s = float(ref.get("timeout_s", 5.0))
        opts = {"timeout_s": timeout_s, "cpu_s": int(ref.get("cpu_s", max(1, math.ceil(timeout_s))))}
        opts |= {k: ref[k] for k in ("memory_mb", "stdin") if k in ref}
        programs.append(code + "\n\n" + str(t) + "\n")
        options.append(opts)
        idx.append(i)
    out = np.zeros(len(completions), np.float32)
    for i, res in zip(idx, sandbox.run_many(programs, per_item=options), strict=True):
        out[i] = 1.0 if res.ok else 0.0
    return out
