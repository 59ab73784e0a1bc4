"""Lightning attention layer (7 of every 8 M1 layers), SPEC 1.2.

qkv = silu(x W_qkv) with a per-head [q_h | k_h | v_h] layout; no scale, no positional encoding;
one RMSNorm over all heads jointly (eps 1e-6); a sigmoid output gate from the same input x.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from m1jax import parallel
from m1jax.config import ModelConfig
from m1jax.kernels import lightning_attention
from m1jax.kernels.lightning import decode_step
from m1jax.layers import Context, RMSNorm, param, project
from m1jax.parallel import sequence as sequence_parallel


class LightningAttention(nn.Module):
    """mode: "train", "prefill" (also returns the final fp32 state) or "decode" (one token)."""

    cfg: ModelConfig
    mode: str = "train"

    @nn.compact
    def __call__(self, x: jax.Array, slopes: jax.Array, ctx: Context, cache=None):
        c = self.cfg
        dt, pdt = c.compute_dtype, c.params_dtype
        init = nn.initializers.normal(c.initializer_range)
        h, d = c.num_attention_heads, c.head_dim
        w_qkv = param(self, "qkv", (c.hidden_size, h, 3, d), ("embed", "heads", None, "head_dim"), init, pdt)
        w_gate = param(self, "gate", (c.hidden_size, h, d), ("embed", "heads", "head_dim"), init, pdt)
        w_out = param(self, "out", (h, d, c.hidden_size), ("heads", "head_dim", "embed"), init, pdt)

        x = x.astype(dt)
        w = w_qkv.astype(dt)
        if self.mode == "decode":
            # One token: slicing q, k, v out of the product is cheap, slicing the weight (strided
            # copies) is not.
            qkv = jax.nn.silu(project(x, w))  # [B, 1, H, 3, D]
            q, k, v = (qkv[:, :, :, i] for i in range(3))
        else:
            # Three projections rather than one: slicing q, k, v out of a [B, T, H, 3, D] product
            # costs more (strided copies) than the smaller GEMMs.
            q, k, v = (jax.nn.silu(project(x, w[:, :, i])) for i in range(3))  # [B, T, H, D]

        if self.mode == "decode":
            o, state = decode_step(q[:, 0], k[:, 0], v[:, 0], slopes, cache["state"])
            o = o[:, None]
        elif (mesh := parallel.active_mesh(c, parallel.SEQUENCE)) is not None:  # LASP-2 over "sequence"
            kw = dict(runs=ctx.runs, impl=c.lightning_impl, block_size=c.block_size, mesh=mesh)
            o, state = sequence_parallel.lightning(q, k, v, slopes, **kw)
        else:
            o, state = lightning_attention(
                q, k, v, slopes, segment_ids=ctx.runs, impl=c.lightning_impl, block_size=c.block_size
            )
        o = RMSNorm(c.lightning_norm_eps, axes=("heads", "head_dim"), param_dtype=pdt, name="norm")(o)
        o = jax.nn.sigmoid(project(x, w_gate.astype(dt))) * o
        y = project(o, w_out.astype(dt), n_in=2)
        return y, (None if self.mode == "train" else {"state": state})
