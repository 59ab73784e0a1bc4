"""Needle-in-a-haystack scores: teacher-forced answer loss and exact match per row of a
`m1jax.data.needle.grid` batch, and their table over lengths x depths."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from m1jax.model import M1Model
from m1jax.objective import targets_and_mask, token_nll


@functools.partial(jax.jit, static_argnums=0)
def _answer_stats(cfg, params, tokens, segment_ids, answer_mask):
    logits, _ = M1Model(cfg).apply({"params": params}, tokens, segment_ids)
    targets, _ = targets_and_mask(tokens, segment_ids)
    nll = token_nll(logits, targets)
    right = (jnp.argmax(logits, -1) == targets) | (answer_mask == 0)
    n = jnp.maximum(jnp.sum(answer_mask, -1), 1.0)
    return jnp.sum(nll * answer_mask, -1) / n, jnp.all(right, -1)


def score(cfg, params, batch: dict, rows_per_call: int = 64) -> dict[str, np.ndarray]:
    """Teacher-forced answer metrics per row of a `grid` batch: {"nll": mean NLL of the answer tokens
    (nats), "exact": all answer tokens are the argmax}. Rows go through the model `rows_per_call` at
    a time (padding the last call, so one compiled shape serves every call)."""
    n = batch["tokens"].shape[0]
    nll, exact = [], []
    for s in range(0, n, rows_per_call):
        part = {k: batch[k][s : s + rows_per_call] for k in ("tokens", "segment_ids", "answer_mask")}
        m = part["tokens"].shape[0]
        if m < rows_per_call and n > rows_per_call:
            extra = rows_per_call - m
            part = {k: np.concatenate([v, np.zeros((extra, *v.shape[1:]), v.dtype)]) for k, v in part.items()}
        a, b = jax.device_get(_answer_stats(cfg, params, part["tokens"], part["segment_ids"], part["answer_mask"]))
        nll.append(np.asarray(a)[:m])
        exact.append(np.asarray(b)[:m])
    return {"nll": np.concatenate(nll), "exact": np.concatenate(exact)}


def table(batch: dict, scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mean answer NLL and accuracy per (length, depth) cell: {"lengths", "depths", "nll" [L, D], "accuracy" [L, D]}."""
    lengths, depths = np.unique(batch["length"]), np.unique(batch["depth"])
    nll = np.zeros((len(lengths), len(depths)))
    acc = np.zeros_like(nll)
    for i, n in enumerate(lengths):
        for j, d in enumerate(depths):
            sel = (batch["length"] == n) & (batch["depth"] == d)
            nll[i, j] = scores["nll"][sel].mean()
            acc[i, j] = scores["exact"][sel].mean()
    return {"lengths": lengths, "depths": depths, "nll": nll, "accuracy": acc}
