"""Held-out accuracy on the embedded task corpus: greedy completions of test prompts, scored
against their answers (the tasks' own check)."""

from __future__ import annotations

import numpy as np

from m1jax.data import tasks as task_lib
from m1jax.generate import generate


def greedy_accuracy(
    cfg, params, tokenizer, *, seed: int, tasks: tuple[str, ...], n: int, max_new_tokens: int
) -> tuple[list[dict], float]:
    """([{"prompt", "completion", "answer", "reward"}] for `n` test prompts of `tasks`, mean reward).
    The prompts are a pure function of `seed`: every call sees the same ones."""
    stream = task_lib.examples(seed, "test", tasks)
    exs = [next(stream) for _ in range(n)]
    prompts = [tokenizer.encode(e.prompt, bos=True) for e in exs]
    gen = generate(cfg, params, prompts, max_new_tokens, greedy=True, stop_tokens=[tokenizer.eos_id])
    toks, lengths = np.asarray(gen.tokens), np.asarray(gen.lengths)
    rows = []
    for e, t, k in zip(exs, toks, lengths, strict=True):
        text = tokenizer.decode(t[:k].tolist(), skip_special=False).replace("<eos>", "")
        rows.append(
            {"prompt": e.prompt, "completion": text, "answer": e.answer, "reward": task_lib.score(text, e.answer)}
        )
    return rows, float(np.mean([r["reward"] for r in rows]))
