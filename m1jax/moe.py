"""Top-k Mixture of Experts (SPEC 1.4): fp32 router, renormalised top-k, SwiGLU experts, dropless.

Three expert implementations compute the same function:
- "dense": every expert on every token, weighted by the (sparse) combine matrix. E/k x the work;
  the simplest oracle, best for tiny models.
- "tiled": assignments sorted by expert, each expert's group padded to whole tiles of `m` rows,
  a loop of matmuls over the tiles. ~1x the work; the CPU path.
- "ragged": sorted assignments through `jax.lax.ragged_dot` (grouped GEMM on TPU/GPU; on CPU XLA
  lowers it to a masked dense product, E x the work).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from m1jax.config import ModelConfig
from m1jax.layers import param

_F32 = jnp.float32


class RouterStats(NamedTuple):
    """Additive router statistics of one layer (summed over valid tokens)."""

    counts: jax.Array  # [E] top-k assignments per expert (all k choices)
    prob_sum: jax.Array  # [E] sum of router probabilities
    tokens: jax.Array  # [] number of valid tokens


def switch_aux_loss(stats: RouterStats, num_experts: int) -> jax.Array:
    """E * sum_e f_e * P_e over the pooled (layer, token) rows; equals top-k at perfect balance."""
    n = jnp.maximum(jnp.sum(stats.tokens), 1.0)
    f = jnp.sum(stats.counts.reshape(-1, num_experts), axis=0) / n
    p = jnp.sum(stats.prob_sum.reshape(-1, num_experts), axis=0) / n
    return num_experts * jnp.sum(f * p)


def route(x, w_router, k: int):
    """x [N, D] -> (probs [N, E] fp32, weights [N, k] fp32 renormalised, expert ids [N, k])."""
    logits = jnp.dot(x.astype(_F32), w_router.astype(_F32), precision=jax.lax.Precision.HIGHEST)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, ids = jax.lax.top_k(probs, k)
    return probs, weights / jnp.sum(weights, axis=-1, keepdims=True), ids


def _swiglu(x, w1, w3, w2, eq_in: str, eq_out: str):
    h = jax.nn.silu(jnp.einsum(eq_in, x, w1)) * jnp.einsum(eq_in, x, w3)
    return jnp.einsum(eq_out, h, w2)


def experts_dense(x, weights, ids, w1, w3, w2):
    n, e = x.shape[0], w1.shape[0]
    combine = jnp.zeros((n, e), weights.dtype).at[jnp.arange(n)[:, None], ids].add(weights)
    y = _swiglu(x, w1, w3, w2, "nd,edf->enf", "enf,efd->end")  # [E, N, D]
    return jnp.einsum("end,ne->nd", y, combine.astype(y.dtype))


def _sort(ids, num_experts: int):
    """Flatten [N, k] assignments, order them by expert. Returns (order, group sizes)."""
    flat = ids.reshape(-1)
    return jnp.argsort(flat, stable=True), jnp.bincount(flat, length=num_experts)


def _combine(y, weights):
    """[N, k, D] expert outputs -> [N, D] weighted by each token's renormalised router weights."""
    return jnp.einsum("nkd,nk->nd", y, weights.astype(y.dtype))


def experts_ragged(x, weights, ids, w1, w3, w2):
    k = ids.shape[1]
    order, sizes = _sort(ids, w1.shape[0])
    xs = x[order // k]
    h = jax.nn.silu(jax.lax.ragged_dot(xs, w1, sizes)) * jax.lax.ragged_dot(xs, w3, sizes)
    y_sorted = jax.lax.ragged_dot(h, w2, sizes)
    return _combine(jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(*ids.shape, -1), weights)


def tile_rows(num_assignments: int, num_experts: int) -> int:
    """Tile height: ~ rows per expert, a power of two in [1, 128] (1 = per-assignment, for decode)."""
    per_expert = max(1, num_assignments // num_experts)
    return min(128, 1 << (per_expert.bit_length() - 1))


def experts_tiled(x, weights, ids, w1, w3, w2):
    n, k = ids.shape
    e = w1.shape[0]
    nk = n * k
    m = tile_rows(nk, e)
    num_tiles = -(-(nk + e * (m - 1)) // m)  # static bound on sum_e ceil(size_e / m)
    # Buffer row of each assignment: its expert's first padded row + its rank within the expert.
    # A running count replaces a sort, and rows go in once and out once (no unsort pass).
    flat = ids.reshape(-1)
    onehot = (flat[:, None] == jnp.arange(e)).astype(jnp.int32)  # [N*k, E]
    rank = jnp.sum(jnp.cumsum(onehot, axis=0) * onehot, axis=1) - 1
    padded = -(-jnp.sum(onehot, axis=0) // m) * m
    padded_end = jnp.cumsum(padded)
    row = (padded_end - padded)[flat] + rank
    buf = jnp.zeros((num_tiles * m, x.shape[1]), x.dtype).at[row].set(jnp.repeat(x, k, axis=0))
    tile_expert = jnp.minimum(jnp.searchsorted(padded_end, jnp.arange(num_tiles) * m, side="right"), e - 1)
    used = jnp.arange(num_tiles) * m < padded_end[-1]

    tiles = buf.reshape(num_tiles, m, -1)
    h = jax.nn.silu(tile_matmul(tiles, w1, tile_expert, used)) * tile_matmul(tiles, w3, tile_expert, used)
    yt = tile_matmul(h, w2, tile_expert, used)
    return _combine(yt.reshape(num_tiles * m, -1)[row].reshape(n, k, -1), weights)


@jax.custom_vjp
def tile_matmul(x, w, tile_expert, live):
    """x [S, m, K] tiles sorted by expert, w [E, K, N], tile_expert [S], live [S] -> [S, m, N].

    Tile s is x[s] @ w[tile_expert[s]] (zeros where not live). A loop over tiles indexing the
    weights in place: a gathered weight copy per tile costs more memory traffic than the matmul on
    CPU. The custom VJP accumulates each tile's weight gradient into its expert's slice only;
    autodiff of the loop would add a full [E, K, N] cotangent per tile.
    """
    return _tile_mm(x, w, tile_expert, live, transpose=False)


def _tile_mm(x, w, tile_expert, live, transpose: bool):
    def body(_, xs):
        xt, ex, on = xs
        mm = lambda: xt @ (w[ex].T if transpose else w[ex])
        shape = (xt.shape[0], w.shape[1] if transpose else w.shape[2])
        return None, jax.lax.cond(on, mm, lambda: jnp.zeros(shape, xt.dtype))

    return jax.lax.scan(body, None, (x, tile_expert, live))[1]


def _tile_matmul_fwd(x, w, tile_expert, live):
    return _tile_mm(x, w, tile_expert, live, transpose=False), (x, w, tile_expert, live)


def _tile_matmul_bwd(res, dy):
    x, w, tile_expert, live = res
    dx = _tile_mm(dy, w, tile_expert, live, transpose=True)

    def body(dw, xs):
        xt, dyt, ex, on = xs
        add = lambda: jax.lax.dynamic_update_index_in_dim(dw, dw[ex] + xt.T @ dyt, ex, 0)
        return jax.lax.cond(on, add, lambda: dw), None

    dw = jax.lax.scan(body, jnp.zeros(w.shape, w.dtype), (x, dy, tile_expert, live))[0]
    return dx, dw, None, None


tile_matmul.defvjp(_tile_matmul_fwd, _tile_matmul_bwd)


_IMPLS = {"dense": experts_dense, "tiled": experts_tiled, "ragged": experts_ragged}


def resolve_impl(impl: str) -> str:
    if impl != "auto":
        return impl
    return "tiled" if jax.default_backend() == "cpu" else "ragged"


class MoE(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array):
        """x [B, T, D], valid [B, T] bool -> (y [B, T, D], RouterStats)."""
        c = self.cfg
        dt, pdt = c.compute_dtype, c.params_dtype
        init = nn.initializers.normal(c.initializer_range)
        e, d, f = c.num_local_experts, c.hidden_size, c.intermediate_size
        # The router is fp32 in the published checkpoint whatever param_dtype is.
        w_router = param(self, "router", (d, e), ("embed", "expert"), init, _F32)
        w1 = param(self, "w1", (e, d, f), ("expert", "embed", "mlp"), init, pdt)  # gate
        w3 = param(self, "w3", (e, d, f), ("expert", "embed", "mlp"), init, pdt)  # up
        w2 = param(self, "w2", (e, f, d), ("expert", "mlp", "embed"), init, pdt)  # down

        b, t, _ = x.shape
        xf = x.reshape(b * t, d)
        probs, weights, ids = route(xf, w_router, c.num_experts_per_tok)
        impl = _IMPLS[resolve_impl(c.moe_impl)]
        y = impl(xf.astype(dt), weights, ids, w1.astype(dt), w3.astype(dt), w2.astype(dt))

        vf = valid.reshape(-1).astype(_F32)
        counts = jnp.zeros((e,), _F32).at[ids.reshape(-1)].add(jnp.repeat(vf, ids.shape[1]))
        stats = RouterStats(counts, jnp.sum(probs * vf[:, None], axis=0), jnp.sum(vf))
        return y.reshape(b, t, d).astype(dt), stats
