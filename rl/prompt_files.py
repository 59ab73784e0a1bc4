"""Prompt sources from local files: jsonl or parquet rows of a prompt and what its reward checks.

`data.source="file"` with `data.prompts=PATH` (`.jsonl` or `.parquet`): every row has the prompt
text under `data.prompt_field` ("prompt") and the fields its rewards read, which become the row's
ref: "answer" for `math` (checked by math-verify; every gold answer is parsed when the file is
loaded), `task` and `positions`; "tests" for `code` (asserts run after the program in
`rl.sandbox`). Other fields ride along in the ref. A row without a needed field, with a field of the
wrong type, or with a gold answer math-verify cannot parse is an error naming the file, the row
(1-based line of a jsonl, 0-based row of a parquet) and the field.

The last `held_out` rows are the evaluation prompts; a step's prompts are drawn from the others by
(seed, step), so a resumed run sees the same prompts. `write_examples` writes the small math and
code files the tests and the README use (generated, never downloaded).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

NEEDS = {"task": "answer", "positions": "answer", "math": "answer", "code": "tests"}  # reward -> ref field


def _read(path: str) -> tuple[tuple[str, Mapping[str, Any]], ...]:
    """[(where, row)]: read once per version of the file (its mtime and size)."""
    if not os.path.isfile(path):
        raise ValueError(f"config.data.prompts={path!r}: no such file")
    st = os.stat(path)
    return _read_version(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _read_version(path: str, mtime_ns: int, size: int) -> tuple[tuple[str, Mapping[str, Any]], ...]:
    rows = []
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {i} is not JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}: line {i} is a JSON {type(row).__name__}, not an object")
                rows.append((f"line {i}", row))
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            rows.append((f"row {i}", row))
    else:
        raise ValueError(f"config.data.prompts={path!r}: use a .jsonl or .parquet file")
    if not rows:
        raise ValueError(f"{path}: no rows")
    return tuple(rows)


def load(path: str, prompt_field: str, rewards: tuple[str, ...]) -> list[tuple[str, dict]]:
    """[(prompt, ref)] of every row, checked for the fields `rewards` read (ValueError naming file,
    row, field). Checked once per version of the file."""
    st = os.stat(path) if os.path.isfile(path) else None
    return _load(path, prompt_field, tuple(sorted(rewards)), st and (st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=8)
def _load(path: str, prompt_field: str, rewards: tuple[str, ...], version) -> list[tuple[str, dict]]:
    needed = sorted({NEEDS[r] for r in rewards if r in NEEDS})
    out = []
    for where, row in _read(path):
        for f in (prompt_field, *needed):
            if f not in row or row[f] is None:
                raise ValueError(f"{path}: {where} has no field {f!r} (fields: {sorted(row)})")
            if not isinstance(row[f], str | int | float) or isinstance(row[f], bool):
                raise ValueError(f"{path}: {where}, field {f!r} is a {type(row[f]).__name__}, not text")
        ref = {k: v for k, v in row.items() if k != prompt_field}
        if "answer" in ref:
            ref["answer"] = str(ref["answer"])
        out.append((str(row[prompt_field]), ref))
    if "math" in rewards:
        _check_math(path, out)
    return out


def _check_math(path: str, rows) -> None:
    import threading

    from math_verify import parse

    t = 5 if threading.current_thread() is threading.main_thread() else None  # (SIGALRM: main thread only)
    where = [w for w, _ in _read(path)]
    for w, (_, ref) in zip(where, rows, strict=True):
        gold = ref["answer"]
        found = parse(gold, parsing_timeout=t) or parse(f"${gold}$", parsing_timeout=t)
        if not any(not isinstance(x, str) for x in found):  # (the input string alone comes back as a fallback)
            raise ValueError(f"{path}: {w}, field 'answer': math-verify cannot parse {gold!r}")


def batch(path: str, prompt_field: str, rewards: tuple[str, ...], seed: int, step: int, n: int, held_out: int):
    """`n` (prompt, ref) pairs of `step` (-1: the first `n` evaluation rows). The last `held_out`
    rows (at most half the file) are for evaluation; a step draws from the rest by (seed, step)."""
    rows = load(path, prompt_field, rewards)
    k = min(held_out, len(rows) // 2)
    train, evals = rows[: len(rows) - k], rows[len(rows) - k :]
    if step < 0:
        return (evals or train)[:n]
    rng = np.random.default_rng([seed, step, 3])
    idx = rng.choice(len(train), n, replace=n > len(train))
    return [train[i] for i in idx]


def write_examples(directory: str) -> dict[str, str]:
    """Write `math.jsonl` (fractions, powers, linear equations; LaTeX gold answers) and `code.parquet`
    (small functions with asserts) into `directory`; returns their paths by kind."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    math_rows = []
    for i in range(64):
        a, b, c = (int(x) for x in rng.integers(2, 20, 3))
        kind = i % 3
        if kind == 0:
            q, ans = f"What is {a}/{b} + 1/{b}? Give a fraction in lowest terms.", _frac(a + 1, b)
        elif kind == 1:
            q, ans = f"What is {a} to the power {c % 4 + 2}?", str(a ** (c % 4 + 2))
        else:
            q, ans = f"Solve {a}x + {b} = {a * c + b} for x.", str(c)
        math_rows.append({"prompt": q + "\n", "answer": ans, "kind": ["fraction", "power", "linear"][kind]})
    paths = {"math": os.path.join(directory, "math.jsonl"), "code": os.path.join(directory, "code.parquet")}
    with open(paths["math"], "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in math_rows)
    code_rows = []
    for i in range(32):
        k = int(rng.integers(2, 9))
        name = ["add_k", "times_k", "repeat_k"][i % 3]
        body = {"add_k": "x + {k}", "times_k": "x * {k}", "repeat_k": "str(x) * {k}"}[name].format(k=k)
        xs = [int(x) for x in rng.integers(0, 50, 3)]
        want = [eval(body, {"x": x}) for x in xs]  # noqa: S307 (our own generated expression)
        tests = "\n".join(f"assert {name}({x}) == {w!r}" for x, w in zip(xs, want, strict=True))
        prompt = f"Write a Python function {name}(x) that returns {body}.\n"
        code_rows.append({"prompt": prompt, "tests": tests, "solution": f"def {name}(x):\n    return {body}\n"})
    pq.write_table(pa.Table.from_pylist(code_rows), paths["code"])
    return paths


def _frac(p: int, q: int) -> str:
    from math import gcd

    g = gcd(p, q)
    p, q = p // g, q // g
    return str(p) if q == 1 else f"\\frac{{{p}}}{{{q}}}"
