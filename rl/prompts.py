"""Prompt sources for RL: the embedded reasoning tasks, and a from-scratch digit toy.

A source gives, for a step (or the evaluation set), prompt texts plus the metadata their rewards
need (`refs`: {"answer", "task", ...}). Prompts are a pure function of (seed, step), so a resumed
run sees exactly the prompts an uninterrupted one would, with no iterator state to checkpoint.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import numpy as np

from m1jax.data import tasks as task_lib

DIGITS = "0123456789"


class DigitTokenizer:
    """The toy's tokenizer: <pad> <bos> <eos> "=" and the ten digits (vocab 14).

    Decoding maps each id to exactly one character ("_" for specials), so response positions line
    up with answer positions for the "positions" reward.
    """

    vocab_size = 14
    pad_id, bos_id, eos_id = 0, 1, 2
    _chars = "___=" + DIGITS

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        if any(ch not in self._chars[3:] for ch in text):
            raise ValueError(f"DigitTokenizer encodes digits and '=' only, got {text!r}")
        ids = [self._chars.index(ch, 3) for ch in text]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        chars = (self._chars[i] if 0 <= i < len(self._chars) else "_" for i in ids)
        return "".join(c for c in chars if not (skip_special and c == "_"))

    def __repr__(self) -> str:
        return "DigitTokenizer()"


def _toy(rng: np.random.Generator, kind: str, length: int) -> tuple[str, dict]:
    s = "".join(rng.choice(list(DIGITS), length))
    answer = s if kind == "toy_copy" else s[::-1]
    return s + "=", {"answer": answer, "task": kind, "raw": True}


def batch(source: str, seed: int, step: int, n: int, *, tasks=task_lib.TASKS, toy_length: int = 4, split="train"):
    """`n` (prompt text, ref) pairs for `step` (step -1: the fixed evaluation prompts)."""
    if source in ("toy_copy", "toy_reverse"):
        # Evaluation draws from a disjoint seed stream; the toy has no held-out strings to speak of.
        rng = np.random.default_rng([seed, step + 1, 1 if split == "train" else 2])
        return [_toy(rng, source, toy_length) for _ in range(n)]
    if source != "tasks":
        raise ValueError(f"unknown prompt source {source!r}")
    # The task stream of the pretraining issue: per-step seeds keep the stream stateless.
    stream = task_lib.examples(seed * 1_000_003 + step + 1, split, tuple(tasks))
    out = []
    for ex in itertools.islice(stream, n):
        out.append((ex.prompt, {"answer": ex.answer, "task": ex.task, "difficulty": ex.difficulty}))
    return out


def for_config(c, step: int, n: int, split: str = "train"):
    """`n` (prompt text, ref) pairs of `step` (-1: evaluation) from the config's source."""
    if c.data.source == "file":
        from rl import prompt_files
        from rl.config import reward_weights

        rewards = tuple(reward_weights(c.rl.reward))
        return prompt_files.batch(
            c.data.prompts, c.data.prompt_field, rewards, c.data.seed, step, n, held_out=c.eval.prompts
        )
    return batch(c.data.source, c.data.seed, step, n, tasks=c.data.tasks, toy_length=c.data.toy_length, split=split)
