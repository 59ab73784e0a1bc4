"""The language-model objective: next-token targets inside documents and their cross entropy.

Shared by the pretraining step (`m1jax.train.step`) and the evaluations (`m1jax.evals`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from m1jax.config import ModelConfig
from m1jax.data.pipeline import loss_mask
from m1jax.model import head_weight, lm_head

_F32 = jnp.float32


def targets_and_mask(tokens, segment_ids):
    """[B, T] -> (targets [B, T], mask [B, T] fp32): position t predicts token t+1 of its own document."""
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    mask = jnp.concatenate([loss_mask(segment_ids), jnp.zeros_like(segment_ids[:, :1], bool)], axis=1)
    return targets, mask.astype(_F32)


def token_nll(logits, targets):
    """[B, T, V] fp32, [B, T] -> [B, T] negative log-likelihood (logsumexp - target logit)."""
    tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - tgt


def chunked_nll_sum(cfg: ModelConfig, params, hidden, targets, mask, chunk: int):
    """Sum of masked NLL with the LM head applied `chunk` tokens at a time, [B, chunk, V] logits
    recomputed in the backward: the full [B, T, V] fp32 logits (26 GB for one 32K-token row of M1's
    200K vocabulary) never exist. hidden [B, T, D], targets / mask [B, T]."""
    b, t, d = hidden.shape
    head = head_weight(cfg, params)
    split = lambda x: jnp.swapaxes(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 0, 1)

    @jax.checkpoint
    def body(total, xs):
        h, tgt, m = xs
        return total + jnp.sum(token_nll(lm_head(cfg, h, head), tgt) * m), None

    total, _ = jax.lax.scan(body, jnp.zeros((), _F32), (split(hidden), split(targets), split(mask)))
    return total
