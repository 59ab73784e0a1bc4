"""Rollouts: sampling with the hybrid cache, returning each token's log-probability.

The log-probabilities are those of the distribution the token was actually drawn from (after
temperature, top-k and top-p, computed in fp32 from the fp32 LM head), so with top_k = 0 and
top_p = 1 they equal the trainer's recomputation `sequence_logprobs` at the same temperature.
`sample` runs on the rollout engine (`rl.engine`: continuous batching over `slots` decode slots,
one prefill per group of identical prompts); `sample_fixed` is the earlier fixed-batch sampler
(one jitted `lax.while_loop` over the whole batch until its longest row ends), kept as the
baseline of `experiments/benchmarks/rollout.py`.

A row finishes on a stop token (kept, it is part of the response), at `max_new_tokens`, or, as in
MiniMax-M1, when `confident_run` consecutive tokens each had model probability (after temperature,
before top-k / top-p) > `confident_prob` (a degenerate loop; M1: 3000 and 0.99; 0 disables).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from m1jax.config import ModelConfig
from m1jax.generate import decode_step, left_pad, prefill, process_logits
from m1jax.model import M1Model, check_tokens
from rl import engine
from rl.engine import FINISH_CONFIDENT, FINISH_LENGTH, FINISH_STOP

_F32 = jnp.float32
__all__ = ["FINISH_CONFIDENT", "FINISH_LENGTH", "FINISH_STOP", "Rollout", "SamplingParams", "sample", "sample_fixed"]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    stop_tokens: tuple[int, ...] = ()
    pad_id: int = 0
    confident_run: int = 0
    confident_prob: float = 0.99
    slots: int | None = None  # rollout-engine decode slots; None = one per row (every sample in flight)
    record_routes: bool = False  # return each token's experts per layer (Rollout.routes, for router replay)

    def __post_init__(self):
        if self.slots is not None and self.slots < 1:
            raise ValueError(f"slots must be >= 1 (or None: one per row), got {self.slots}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (or greedy=True), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")


class Rollout(NamedTuple):
    prompt: jax.Array  # [B, T] prompt ids, left-padded with pad_id
    prompt_lengths: jax.Array  # [B]
    tokens: jax.Array  # [B, N] response ids, pad_id after the end
    logprobs: jax.Array  # [B, N] fp32 log-prob of each token under the sampling distribution, 0 after the end
    mask: jax.Array  # [B, N] fp32, 1 on response tokens (stop token included)
    lengths: jax.Array  # [B] response lengths
    finish: jax.Array  # [B] FINISH_STOP | FINISH_LENGTH | FINISH_CONFIDENT
    routes: np.ndarray | None = None  # [B, T + N, L, k] experts of every prompt and response token (record_routes)
    versions: np.ndarray | None = None  # [B, N] the policy version that sampled each token (partial rollouts)
    context: np.ndarray | None = None  # [B, N] 1 on every episode token, tool output included (rl.episodes)
    episode: dict | None = None  # per-episode counters [B] (rl.episodes.COUNTERS) and "turn_reward" [B]


def sample(
    cfg: ModelConfig, params, prompts, sp: SamplingParams, rng, *, pad_multiple: int = 32, stats=None, key_ids=None
) -> Rollout:
    """Sample one response per prompt (repeat a prompt G times in a row for a group of G: the
    engine prefills it once). prompts: ragged id lists. Runs on the rollout engine with
    `sp.slots` decode slots; a sample's tokens depend on its row index (or `key_ids[row]`), the
    key and the parameters only (not on the slot count). `stats`: an `engine.Stats` to count the work.

    The padded prompt length is rounded up to a multiple of `pad_multiple`, so batches of
    different prompt lengths share compiled programs.
    """
    tokens, lengths = pad_prompts(cfg, prompts, sp, pad_multiple)
    if key_ids is not None and len(key_ids) != len(lengths):
        raise ValueError(f"sample: {len(key_ids)} key_ids for {len(lengths)} prompts")
    rows = [tokens[i, tokens.shape[1] - lengths[i] :] for i in range(len(lengths))]
    slots = sp.slots if sp.slots is not None else len(rows)
    toks, logp, length, finish, routes = engine.run(
        cfg, sp, params, rows, rng, slots=slots, pad_multiple=pad_multiple, stats=stats, key_ids=key_ids
    )
    mask = (np.arange(sp.max_new_tokens)[None, :] < length[:, None]).astype(np.float32)
    return Rollout(tokens, lengths, toks, logp * mask, mask, length, finish, routes)


def sample_fixed(cfg: ModelConfig, params, prompts, sp: SamplingParams, rng, *, pad_multiple: int = 32) -> Rollout:
    """The fixed-batch sampler: every row decodes until the longest has finished (one key per step
    for the whole batch, so a row's tokens depend on its batch-mates). The engine's baseline."""
    if sp.record_routes:
        raise ValueError("sample_fixed does not record routes (record_routes=True): use sample")
    tokens, lengths = pad_prompts(cfg, prompts, sp, pad_multiple)
    return _sample(cfg, sp, params, jnp.asarray(tokens), jnp.asarray(lengths), rng)


def pad_prompts(cfg, prompts, sp: SamplingParams, pad_multiple: int):
    tokens, lengths = left_pad(prompts, sp.pad_id)
    extra = -tokens.shape[1] % pad_multiple
    tokens = np.pad(tokens, ((0, 0), (extra, 0)), constant_values=sp.pad_id)
    check_tokens(tokens, cfg.vocab_size)
    return tokens, lengths


@functools.partial(jax.jit, static_argnums=(0, 1))
def _sample(cfg: ModelConfig, sp: SamplingParams, params, prompt, prompt_lengths, rng) -> Rollout:
    b, t = prompt.shape
    n = sp.max_new_tokens
    logits, cache = prefill(cfg, params, prompt, t + n, lengths=prompt_lengths, last_only=True)
    stops = jnp.asarray(sp.stop_tokens or (-1,), jnp.int32)

    def cond(carry):
        i, _, _, done, *_ = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, last, cache, done, run, finish, end, toks, logps, key = carry
        key, sub = jax.random.split(key)
        proc = process_logits(last, temperature=1.0 if sp.greedy else sp.temperature, top_k=sp.top_k, top_p=sp.top_p)
        tok = jnp.argmax(proc, axis=-1) if sp.greedy else jax.random.categorical(sub, proc, axis=-1)
        logp = jnp.take_along_axis(jax.nn.log_softmax(proc, axis=-1), tok[:, None], axis=-1)[:, 0]
        tok = jnp.where(done, sp.pad_id, tok).astype(jnp.int32)
        logp = jnp.where(done, 0.0, logp)
        # M1's rule is about the model's probability (temperature only), not the truncated one's.
        temp = 1.0 if sp.greedy else sp.temperature
        model_logp = jnp.take_along_axis(jax.nn.log_softmax(last / temp, axis=-1), tok[:, None], axis=-1)[:, 0]
        run = jnp.where(~done & (jnp.exp(model_logp) > sp.confident_prob), run + 1, 0)
        stopped = jnp.isin(tok, stops)
        confident = (run >= sp.confident_run) if sp.confident_run > 0 else jnp.zeros_like(done)
        at_end = i == n - 1
        newly = ~done & (stopped | confident | at_end)
        reason = jnp.where(stopped, FINISH_STOP, jnp.where(confident, FINISH_CONFIDENT, FINISH_LENGTH))
        finish = jnp.where(newly, reason, finish)
        end = jnp.where(newly, i, end)
        toks, logps = toks.at[:, i].set(tok), logps.at[:, i].set(logp)
        out, cache = decode_step(cfg, params, cache, tok[:, None])
        return i + 1, out[:, 0], cache, done | newly, run, finish, end, toks, logps, key

    init = (
        jnp.asarray(0, jnp.int32),
        logits[:, -1],
        cache,
        jnp.zeros((b,), bool),
        jnp.zeros((b,), jnp.int32),
        jnp.full((b,), FINISH_LENGTH, jnp.int32),
        jnp.full((b,), n - 1, jnp.int32),
        jnp.full((b, n), sp.pad_id, jnp.int32),
        jnp.zeros((b, n), _F32),
        rng,
    )
    _, _, _, _, _, finish, end, toks, logps, _ = jax.lax.while_loop(cond, body, init)
    mask = (jnp.arange(n)[None, :] <= end[:, None]).astype(_F32)  # up to the finishing token
    return Rollout(prompt, prompt_lengths, toks, logps * mask, mask, end + 1, finish)


def sequence_logprobs(
    cfg: ModelConfig,
    params,
    prompt,
    prompt_lengths,
    response,
    mask,
    temperature: float = 1.0,
    routes=None,
    context=None,
):
    """The trainer's log pi(response) [B, N] fp32 (0 outside `mask`), teacher-forced in one pass.

    The sequence is [left-padded prompt | response]; padding on either side is segment 0, so positions,
    the lightning state and attention match the sampler's cache exactly. `context` [B, N]: the
    response tokens in the sequence when they are more than `mask` (a multi-turn episode's tool
    output: attended to, no loss); default `mask`. Jittable. `routes`
    [B, T + N, L, k]: replay these experts (`Rollout.routes`); aux then holds
    "router_flip_fraction", the fraction of (valid token, layer) pairs whose own top-k differs.
    """
    b, t = prompt.shape
    n = response.shape[1]
    seq = jnp.concatenate([prompt, response.astype(prompt.dtype)], axis=1)
    real_prompt = jnp.arange(t)[None, :] >= (t - prompt_lengths)[:, None]
    present = mask if context is None else context
    segment_ids = jnp.concatenate([real_prompt, present > 0], axis=1).astype(jnp.int32)
    logits, aux = M1Model(cfg).apply({"params": params}, seq, segment_ids, routes=routes)
    if routes is not None:
        pairs = jnp.sum(segment_ids > 0) * cfg.num_hidden_layers
        aux["router_flip_fraction"] = aux["router_flips"] / jnp.maximum(pairs, 1).astype(_F32)
    logits = logits[:, t - 1 : t + n - 1].astype(_F32) / temperature  # position t-1+j predicts response j
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), response[..., None], axis=-1)[..., 0]
    return jnp.where(mask > 0, logp, 0.0), logits, aux


def entropy(logits, mask):
    """Mean per-token entropy (nats) of softmax(logits) [B, N, V] over `mask`."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    h = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return jnp.sum(h * mask) / jnp.maximum(jnp.sum(mask), 1.0)
