"""Softmax attention layer (every 8th M1 layer): GQA, partial NeoX RoPE, causal, no biases."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from m1jax import parallel
from m1jax.config import ModelConfig
from m1jax.kernels.softmax import flash_attention
from m1jax.layers import Context, apply_rope, param, project
from m1jax.parallel import sequence as sequence_parallel

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


class SoftmaxAttention(nn.Module):
    """mode: "train" (full causal), "prefill" (also returns a [B, max_len] KV cache) or "decode"."""

    cfg: ModelConfig
    mode: str = "train"
    max_len: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, ctx: Context, cache=None):
        c = self.cfg
        dt, pdt = c.compute_dtype, c.params_dtype
        init = nn.initializers.normal(c.initializer_range)
        h, g, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        wq = param(self, "q", (c.hidden_size, h, d), ("embed", "heads", "head_dim"), init, pdt)
        wk = param(self, "k", (c.hidden_size, g, d), ("embed", "kv_heads", "head_dim"), init, pdt)
        wv = param(self, "v", (c.hidden_size, g, d), ("embed", "kv_heads", "head_dim"), init, pdt)
        wo = param(self, "o", (h, d, c.hidden_size), ("heads", "head_dim", "embed"), init, pdt)

        x = x.astype(dt)
        q, k, v = (project(x, w.astype(dt)) for w in (wq, wk, wv))  # [B, T, H or G, D]
        q = apply_rope(q, ctx.positions, c.rotary_dim, c.rope_theta)
        k = apply_rope(k, ctx.positions, c.rotary_dim, c.rope_theta)

        new_cache = None
        if self.mode == "decode":
            slot = (0, ctx.index, 0, 0)
            k_all = lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), slot)
            v_all = lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), slot)
            slots = jnp.arange(k_all.shape[1])
            mask = (slots[None, :] >= ctx.start[:, None]) & (slots[None, :] <= ctx.index)  # [B, S]
            out = gqa_attention(q, k_all.astype(dt), v_all.astype(dt), mask[:, None, :])
            new_cache = {"k": k_all, "v": v_all}
        else:
            t = x.shape[1]
            mesh = parallel.active_mesh(c, parallel.SEQUENCE)
            if mesh is None:
                out = flash_attention(q, k, v, ctx.runs)
            else:  # keys / values all-gathered over "sequence"
                out = sequence_parallel.softmax(q, k, v, runs=ctx.runs, mesh=mesh)
            if self.mode == "prefill":
                pad = [(0, 0), (0, self.max_len - t), (0, 0), (0, 0)]
                new_cache = {"k": jnp.pad(k, pad), "v": jnp.pad(v, pad)}
        y = project(out, wo.astype(dt), n_in=2)
        return y, new_cache
