"""Decoding with a constant-size lightning state and a fixed-size softmax KV cache.

The cache is a pytree: per lightning layer an fp32 state [B, H, Dk, Dv] (independent of context
length), per softmax layer k/v [B, max_len, G, D], plus `index` (next slot: a scalar, or [B] when
each row decodes at its own slot, as in the rollout engine) and `start` [B] (first real slot of
each row). Prompts of different lengths are right-aligned (left padding); padding is
its own document, so it reaches neither the lightning state nor softmax attention.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from m1jax.config import ModelConfig
from m1jax.model import M1Model, check_tokens, head_weight, lm_head


def prefill(
    cfg: ModelConfig, params, tokens, max_len: int, *, lengths=None, record_routes: bool = False, last_only=False
):
    """Run the prompt. tokens [B, T] (left-padded when `lengths` [B] is given).

    Returns (logits fp32 [B, T, V], cache with `max_len` slots), and with `record_routes` also the
    experts each token was routed to, [B, T, L, k] int32 (router replay). last_only: logits [B, 1, V]
    of the last position only (all a sampler needs: the head is most of a small model's prefill
    FLOPs). Jittable (cfg, max_len static).
    """
    t = tokens.shape[1]
    if max_len < t:
        raise ValueError(f"prefill: max_len={max_len} is shorter than the prompt length {t}")
    start = None if lengths is None else (t - jnp.asarray(lengths, jnp.int32))
    logits, aux, cache = M1Model(cfg).apply(
        {"params": params},
        tokens,
        mode="prefill",
        max_len=max_len,
        start=start,
        method=M1Model.run,
        record_routes=record_routes,
        hidden=last_only,
    )
    if last_only:  # final-normed hidden states [B, T, D] -> the last position's logits
        logits = lm_head(cfg, logits[:, -1:], head_weight(cfg, params))
    return (logits, cache, aux["expert_ids"]) if record_routes else (logits, cache)


def decode_step(cfg: ModelConfig, params, cache, tokens, *, record_routes: bool = False):
    """One token per row: tokens [B, 1] -> (logits fp32 [B, 1, V], updated cache), and with
    `record_routes` the token's experts [B, 1, L, k]. Jittable."""
    logits, aux, cache = M1Model(cfg).apply(
        {"params": params}, tokens, cache=cache, mode="decode", method=M1Model.run, record_routes=record_routes
    )
    return (logits, cache, aux["expert_ids"]) if record_routes else (logits, cache)


def process_logits(logits, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """logits [B, V] fp32 -> the sampling distribution's logits: / temperature, then -inf outside the
    top-k (k > 0) and outside the nucleus (smallest set with mass >= top_p)."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return logits


def sample_logits(rng, logits, *, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False):
    """logits [B, V] -> token ids [B]. Nucleus (top-p) filtering after temperature scaling."""
    if greedy or temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    return jax.random.categorical(rng, process_logits(logits, temperature=temperature, top_p=top_p), axis=-1)


class Generation(NamedTuple):
    tokens: jax.Array  # [B, N] generated ids, `pad_id` after a stop token
    lengths: jax.Array  # [B] generated tokens per row, stop token included
    logprobs: jax.Array  # [B, N] log-probability of each generated token under the model (T = 1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ragged prompts (lists of token ids, or a [B, T] array) -> (tokens [B, T] right-aligned, lengths [B])."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence | np.ndarray | jax.Array):
        raise TypeError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("no prompts given: pass at least one list of token ids")
    rows = []
    for i, p in enumerate(prompts):
        try:
            row = np.asarray(p)
        except ValueError:  # ragged nesting
            row = np.asarray(None)
        if row.ndim != 1 or not (row.size == 0 or np.issubdtype(row.dtype, np.integer)):
            raise TypeError(f"prompt {i} must be a flat list of integer token ids, got {str(p)[:60]!r}")
        lo, hi = (int(row.min()), int(row.max())) if row.size else (0, 0)
        if lo < 0 or hi > np.iinfo(np.int32).max:  # before the int32 cast, which would wrap them
            raise ValueError(f"prompt {i} holds token ids outside [0, 2**31): min {lo}, max {hi}")
        rows.append(row)
    lengths = np.asarray([len(r) for r in rows], np.int32)
    if lengths.min() < 1:
        raise ValueError(f"every prompt needs at least one token; prompt {int(lengths.argmin())} is empty")
    out = np.full((len(rows), int(lengths.max())), pad_id, np.int32)
    for i, r in enumerate(rows):
        out[i, out.shape[1] - len(r) :] = r
    return out, lengths


def generate(
    cfg: ModelConfig,
    params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    rng=None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
) -> Generation:
    """Sample continuations of ragged `prompts` (lists of token ids). temperature 0 is greedy."""
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:  # also NaN
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    tokens, lengths = left_pad(prompts, pad_id)
    check_tokens(tokens, cfg.vocab_size)  # outside jit, where the values are known
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return _generate(
        cfg,
        max_new_tokens,
        float(temperature),
        float(top_p),
        bool(greedy),
        tuple(int(s) for s in stop_tokens),
        int(pad_id),
        params,
        jnp.asarray(tokens),
        jnp.asarray(lengths),
        rng,
    )


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6))
def _generate(cfg, max_new, temperature, top_p, greedy, stop_tokens, pad_id, params, tokens, lengths, rng):
    b, t = tokens.shape
    logits, cache = prefill(cfg, params, tokens, t + max_new, lengths=lengths, last_only=True)
    stops = jnp.asarray(stop_tokens or (-1,), jnp.int32)

    def step(carry, key):
        last, cache, done = carry
        tok = sample_logits(key, last, temperature=temperature, top_p=top_p, greedy=greedy)
        logp = jnp.take_along_axis(jax.nn.log_softmax(last, axis=-1), tok[:, None], axis=-1)[:, 0]
        emitted = jnp.where(done, pad_id, tok)
        new_done = done | jnp.isin(tok, stops)
        out, cache = decode_step(cfg, params, cache, emitted[:, None].astype(jnp.int32))
        return (out[:, 0], cache, new_done), (emitted, jnp.where(done, 0.0, logp), ~done)

    keys = jax.random.split(rng, max_new)
    _, (toks, logps, live) = jax.lax.scan(step, (logits[:, -1], cache, jnp.zeros((b,), bool)), keys)
    return Generation(toks.T, jnp.sum(live, axis=0).astype(jnp.int32), logps.T)
