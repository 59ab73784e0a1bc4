"""rl.rewards: each reward on correct / wrong / garbage completions, the registry and combine."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from m1jax.data import tasks
from rl import rewards

GARBAGE = ["", "   ", "\x00\x01\ufffd", "\udcff lone surrogate", "</think>", "<think>", "🙂" * 50, "a" * 5000]


def _check(out, n):
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (n,)
    assert np.isfinite(out).all()


def test_registry():
    assert set(rewards.available()) >= {"task", "positions", "format", "math", "code"}
    assert rewards.get("task") is rewards.task_reward
    with pytest.raises(KeyError, match="unknown reward 'nope'; available: code, format, math"):
        rewards.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        rewards.register("task")(lambda c, r: np.zeros(len(c), np.float32))


def test_task_reward_on_real_examples():
    rng = np.random.default_rng(0)
    exs = [tasks.make_example(rng, t, 2) for t in tasks.TASKS]
    refs = [{"answer": ex.answer, "task": ex.task} for ex in exs]
    _check(out := rewards.get("task")([ex.completion for ex in exs], refs), len(exs))
    assert (out == 1).all()
    wrong = [ex.completion[: -len(ex.answer)] + ex.answer + "9" for ex in exs]
    assert (rewards.get("task")(wrong, refs) == 0).all()


@pytest.mark.parametrize("name", ["task", "positions", "format", "math"])
def test_garbage_scores_zero(name):
    out = rewards.get(name)(GARBAGE, [{"answer": "7"}] * len(GARBAGE))
    _check(out, len(GARBAGE))
    assert (out == 0).all()


def test_positions():
    comps = ["<think>x</think> 1234", "<think>x</think> 1243", "<think>x</think> 12345", "<think>x</think> 12", "1234"]
    out = rewards.get("positions")(comps, [{"answer": "1234"}] * 5)
    np.testing.assert_allclose(out, [1.0, 0.5, 0.8, 0.5, 0.0])  # no think block: no answer
    raw = rewards.get("positions")(["1234", " 4321\n", "12", ""], [{"answer": "1234", "raw": True}] * 4)
    np.testing.assert_allclose(raw, [1.0, 0.0, 0.5, 0.0])


def test_format():
    comps = [
        "<think>a</think> 7",
        "  <think>a\nb</think>\n7\nextra",
        "<think>a</think>",  # no answer
        "<think>a</think>   \n  ",  # blank answer
        "7",  # no think block
        "<think>a</think><think>b</think> 7",  # two blocks
        "x <think>a</think> 7",  # block not first
        "</think><think> 7",  # wrong order
    ]
    _check(out := rewards.get("format")(comps, [{}] * len(comps)), len(comps))
    assert out.tolist() == [1, 1, 0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize(
    ("gold", "completion", "want"),
    [
        ("0.5", "<think>half</think> \\boxed{\\frac{1}{2}}", 1.0),
        ("\\frac{1}{2}", "0.5", 1.0),
        ("3", "<think>solve</think> $x = 3$", 1.0),
        ("x=3", "\\boxed{3}", 1.0),
        ("\\sqrt{2}", "the answer is \\boxed{2^{1/2}}", 1.0),
        ("-7", "<think>a</think> -7", 1.0),
        ("2", "\\boxed{3}", 0.0),
        ("2", "<think>it is 2</think> no idea", 0.0),  # only the text after </think> counts
        ("123", "garbage", 0.0),
    ],
)
def test_math(gold, completion, want):
    assert rewards.get("math")([completion], [{"answer": gold}]).tolist() == [want]


def test_math_outside_the_main_thread():
    # math_verify's SIGALRM time limits fail off the main thread; the reward turns them off there.
    out = []
    t = threading.Thread(target=lambda: out.append(rewards.get("math")(["\\boxed{1/2}", "x"], [{"answer": "0.5"}] * 2)))
    t.start()
    t.join()
    assert out[0].tolist() == [1.0, 0.0]


TESTS = {"tests": "assert double(2) == 4\nassert double(-3) == -6"}


def test_extract_code():
    fenced = "<think>```python\nold()\n```</think> Here:\n```python\ndef f():\n    pass\n```\ntext"
    assert rewards.extract_code(fenced) == "def f():\n    pass\n"
    assert rewards.extract_code("<think>plan</think>\ndef f(): pass") == "\ndef f(): pass"
    assert rewards.extract_code("def f(): pass") == "def f(): pass"


def test_code_reward():
    comps = [
        "<think>easy</think>\n```python\ndef double(x):\n    return 2 * x\n```",
        "<think>hm</think>\ndef double(x):\n    return x + 2",  # passes the first assert only
        "```python\ndef double(x) return 2x\n```",  # syntax error
        "```python\ndef double(x):\n    while True:\n        pass\n```",  # never returns
        "```python\nimport os\ndef double(x):\n    os.system('true')\n    return 2 * x\n```",  # refused by the sandbox
        "",
        *GARBAGE,
    ]
    refs = [{**TESTS, "timeout_s": 1.0}] * len(comps)
    _check(out := rewards.get("code")(comps, refs), len(comps))
    assert out.tolist() == [1.0] + [0.0] * (len(comps) - 1)


def test_missing_ref_keys_and_lengths_raise():
    for name, key in [("task", "answer"), ("positions", "answer"), ("math", "answer"), ("code", "tests")]:
        with pytest.raises(KeyError, match=f"reward '{name}' needs ref\\['{key}'\\], missing in refs\\[1\\]"):
            rewards.get(name)(["a", "b"], [{"answer": "1", "tests": "pass"}, {"task": "add"}])
    with pytest.raises(ValueError, match="2 completions but 1 refs"):
        rewards.get("format")(["a", "b"], [{}])


def test_combine(monkeypatch):
    comps = ["<think>a</think> 7", "<think>a</think> 8", "7"]
    refs = [{"answer": "7"}] * 3
    fn = rewards.combine({"task": 1.0, "format": 0.25})
    _check(out := fn(comps, refs), 3)
    np.testing.assert_allclose(out, [1.25, 0.25, 0.0])
    np.testing.assert_allclose(rewards.combine({"format": -1.0})(comps, refs), [-1.0, -1.0, 0.0])

    def boom(c, r):
        raise AssertionError("a zero-weight reward must not run")

    monkeypatch.setitem(rewards._REGISTRY, "boom", boom)
    np.testing.assert_allclose(rewards.combine({"task": 2.0, "boom": 0.0})(comps, refs), [2.0, 0.0, 0.0])
    with pytest.raises(KeyError, match="unknown reward 'nope'"):
        rewards.combine({"task": 1.0, "nope": 1.0})
    with pytest.raises(ValueError, match="finite"):
        rewards.combine({"task": float("nan")})
    with pytest.raises(ValueError, match="no rewards"):
        rewards.combine({})
