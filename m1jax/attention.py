"""Softmax attention layer (every 8th M1 layer): GQA, partial NeoX RoPE, causal, no biases."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from m1jax import parallel
from m1jax.config import ModelConfig
from m1jax.kernels import softmax_attention
from m1jax.kernels.softmax.reference import gqa_attention
from m1jax.layers import Context, apply_rope, param, project
from m1jax.parallel import sequence as sequence_parallel

_F32 = jnp.float32


def _write(cache, new, index):
    """Write one token's keys or values new [B, 1, G, D] into cache [B, S, G, D] at slot `index`:
    a scalar (every row at the same slot: one slice update) or [B] (each row its own slot, as the
    rollout engine's decode slots are; a row scatter, in place under donation)."""
    if jnp.ndim(index) == 0:
        return lax.dynamic_update_slice(cache, new, (0, index, 0, 0))
    return cache.at[jnp.arange(cache.shape[0]), index].set(new[:, 0], mode="drop")


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
            k_all, v_all = (_write(cache[n], y.astype(cache[n].dtype), ctx.index) for n, y in (("k", k), ("v", v)))
            slots = jnp.arange(k_all.shape[1])
            index = jnp.reshape(ctx.index, (-1, 1))  # [1 or B, 1]
            mask = (slots[None, :] >= ctx.start[:, None]) & (slots[None, :] <= index)  # [B, S]
            out = gqa_attention(q, k_all.astype(dt), v_all.astype(dt), mask[:, None, :])
            new_cache = {"k": k_all, "v": v_all}
        else:
            t = x.shape[1]
            mesh = parallel.active_mesh(c, parallel.SEQUENCE)
            if mesh is None:
                out = softmax_attention(q, k, v, ctx.runs, impl=c.softmax_impl)
            else:  # keys / values all-gathered over "sequence"
                out = sequence_parallel.softmax(q, k, v, runs=ctx.runs, mesh=mesh)
            if self.mode == "prefill":
                pad = [(0, 0), (0, self.max_len - t), (0, 0), (0, 0)]
                new_cache = {"k": jnp.pad(k, pad), "v": jnp.pad(v, pad)}
        y = project(out, wo.astype(dt), n_in=2)
        return y, new_cache
