"""Reference forms of causal GQA softmax attention: plain jnp, plain autodiff.

`gqa_attention` is one masked softmax over given keys (the decode step uses it too);
`causal_attention` runs it in query blocks over the causal triangle and is the reference that
`flash.flash_attention` (what the model runs) is tested against.
"""

from __future__ import annotations

import jax.numpy as jnp

_F32 = jnp.float32


def gqa_attention(q, k, v, mask):
    """q [B, T, H, D], k/v [B, S, G, D] with H = G * R (R consecutive query heads share a kv head),
    mask broadcastable to [B, T, S] (True = attend). Softmax in fp32. Returns [B, T, H, D]."""
    b, t, h, d = q.shape
    g = k.shape[2]
    r = h // g
    # The R query heads of a group become R*T rows of one matmul per (batch, group): large, plain
    # batched GEMMs; the softmax normaliser is applied to the [.., D] output, not the [.., S] scores.
    qg = q.reshape(b, t, g, r, d).transpose(0, 2, 3, 1, 4).reshape(b, g, r * t, d)
    kg, vg = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, G, S, D]
    scores = jnp.einsum("bgmd,bgsd->bgms", qg, kg, preferred_element_type=_F32) * (d**-0.5)
    scores = scores.reshape(b, g, r, t, -1)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(_F32).min)
    p = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    denom = jnp.sum(p, axis=-1, keepdims=True)  # [B, G, R, T, 1]
    out = jnp.einsum("bgms,bgsd->bgmd", p.astype(v.dtype).reshape(b, g, r * t, -1), vg, preferred_element_type=_F32)
    out = out.reshape(b, g, r, t, d) / denom
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)


def causal_attention(q, k, v, runs=None, *, max_blocks: int = 32, min_block: int = 64):
    """Causal GQA over the full sequence, in query blocks that skip the masked upper triangle: the
    plain-autodiff reference of `m1jax.kernels.softmax.flash_attention` (which the model runs).

    Query block [lo, hi) attends to keys [0, hi) only: about half the work of the full square and
    a working set that fits in cache. The block count is capped, so tracing cost is bounded in T.
    runs: optional [B, T] document index; attention stays inside a document.
    """
    t = q.shape[1]
    n = max(1, min(max_blocks, t // min_block))
    bounds = [round(i * t / n) for i in range(n + 1)]
    outs = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        mask = (jnp.arange(lo, hi)[:, None] >= jnp.arange(hi)[None, :])[None]
        if runs is not None:
            mask = mask & (runs[:, lo:hi, None] == runs[:, None, :hi])
        outs.append(gqa_attention(q[:, lo:hi], k[:, :hi], v[:, :hi], mask))
    return jnp.concatenate(outs, axis=1)
